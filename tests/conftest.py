"""Test-wide settings: decoded-image caches go to a temporary folder, never to the user's ~/.cache."""

import atexit
import os
import shutil
import tempfile

if "METALENS_CACHE" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="metalens-test-cache-")
    os.environ["METALENS_CACHE"] = _cache
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
