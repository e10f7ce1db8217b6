"""Data handling with no learner and no family: decoding images (grey or colour, any size), safe archives,
checksummed downloads, reading image sources, their memory-mapped disk cache, and train-time augmentation.

Every problem with the data (a file that is not an image, a damaged or forged archive, a
decompression bomb, a symbolic link inside a data folder, images that cannot fit in
memory) is a :class:`~metalens.errors.DataError` whose one-line message names the file
and says what to do.
"""

from metalens.data.archives import (UnsafeArchiveError, check_archive, download, extract_zip, md5sum, open_zip,
                                    read_member)
from metalens.data.images import CHANNELS, FITS, IMAGE_SUFFIXES, MAX_PIXELS, RESAMPLE, load_image, normalize
from metalens.data.sources import (ImageSet, count_images, default_root, read_images, resolve_root, save_cache,
                                   source_paths)

__all__ = [
    "load_image", "normalize", "IMAGE_SUFFIXES", "RESAMPLE", "FITS", "CHANNELS", "MAX_PIXELS",
    "UnsafeArchiveError", "check_archive", "open_zip", "read_member", "extract_zip", "md5sum", "download",
    "ImageSet", "read_images", "save_cache", "count_images", "default_root", "resolve_root", "source_paths",
]
