"""Backbones: shapes, per-task batch statistics, seeded initialisation."""

import pytest
import torch

from metalens.nets import MLP, Conv4, ResNet12, TaskBatchNorm2d, drop_block
from metalens.rng import seeded_init

SEED = 0


def test_task_batchnorm_matches_torch_batchnorm_in_training_mode():
    g = torch.Generator().manual_seed(SEED)
    x = torch.randn(6, 4, 5, 5, generator=g, dtype=torch.float64)
    ours, ref = TaskBatchNorm2d(4).double(), torch.nn.BatchNorm2d(4).double().train()
    with torch.no_grad():
        ours.weight.copy_(torch.randn(4, generator=g))
        ref.weight.copy_(ours.weight)
    torch.testing.assert_close(ours(x), ref(x))


def test_conv4_normalises_each_task_with_its_own_statistics():
    net = Conv4((1, 28, 28), 5, channels=8)
    x = torch.randn(3, 10, 1, 28, 28, generator=torch.Generator().manual_seed(SEED))
    batched = net(x)
    looped = torch.stack([net(x[t]) for t in range(3)])
    torch.testing.assert_close(batched, looped)
    shifted = x.clone()
    shifted[0] += 3.0  # changing task 0 must not change tasks 1 and 2
    torch.testing.assert_close(net(shifted)[1:], batched[1:])
    assert Conv4((1, 28, 28), 0, channels=8)(x).shape == (3, 10, 8)  # no head: the embedding


@pytest.mark.parametrize("fused", [False, True])
def test_conv4_pools_before_its_relu_with_the_same_values_and_gradients(fused):
    """embed runs relu(max-pool(z)); the modules in their listed order (ReLU, then pool) give the same
    values and input gradients, with odd sizes (7 -> 3) and negative scales (a window's max is then <= 0)."""
    g = torch.Generator().manual_seed(SEED)
    net = Conv4((2, 14, 14), 3, channels=4, blocks=3, fused_norm=fused).double()
    with torch.no_grad():
        for i in range(1, len(net.features), 4):
            net.features[i].weight.copy_(torch.randn(4, generator=g, dtype=torch.float64))
    x = torch.randn(2, 6, 2, 14, 14, generator=g, dtype=torch.float64, requires_grad=True)

    def listed_order(x):
        z = x.reshape(-1, 2, 14, 14)
        for layer in net.features:
            z = layer(z.view(2, 6, *z.shape[1:])).flatten(0, 1) if isinstance(layer, TaskBatchNorm2d) else layer(z)
        return net.head(z.reshape(2, 6, -1))

    out, ref = net(x), listed_order(x)
    torch.testing.assert_close(out, ref)
    w = torch.randn(out.shape, generator=g, dtype=torch.float64)
    torch.testing.assert_close(torch.autograd.grad((out * w).sum(), x)[0], torch.autograd.grad((ref * w).sum(), x)[0])


def test_shape_errors():
    with pytest.raises(ValueError, match="image inputs"):
        Conv4((784,), 5)
    with pytest.raises(ValueError, match="too small"):
        Conv4((1, 8, 8), 5)
    with pytest.raises(ValueError, match="activation must be one of"):
        MLP((1,), 1, activation="swish")


def test_seeded_init_is_deterministic_and_isolated():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    with seeded_init(SEED):
        a = MLP((1,), 1)
    assert torch.equal(torch.random.get_rng_state(), before)  # global generator untouched
    with seeded_init(SEED):
        b = MLP((1,), 1)
    with seeded_init(SEED + 1):
        c = MLP((1,), 1)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.layers[0].weight, c.layers[0].weight)


def test_fused_task_batchnorm_equals_primitive_ops_with_second_order_gradients():
    g = torch.Generator().manual_seed(SEED)
    x = torch.randn(6, 4, 5, 5, generator=g, dtype=torch.float64, requires_grad=True)
    plain, fused = TaskBatchNorm2d(4).double(), TaskBatchNorm2d(4, fused=True).double()
    with torch.no_grad():
        plain.weight.copy_(torch.randn(4, generator=g))
        fused.weight.copy_(plain.weight)

    def second_order(bn):  # d/dw of |d loss / dx|^2: a Hessian-vector product through the norm
        (gx,) = torch.autograd.grad((bn(x) ** 3).sum(), x, create_graph=True)
        return torch.autograd.grad((gx ** 2).sum(), bn.weight)[0]

    torch.testing.assert_close(fused(x), plain(x))
    torch.testing.assert_close(second_order(fused), second_order(plain))
    # several tasks [2, 3, B, C, H, W] fold into the fused kernel's channels: still per-task statistics
    xt = (torch.randn(2, 3, 6, 4, 5, 5, generator=g, dtype=torch.float64)
          * torch.arange(1.0, 7.0, dtype=torch.float64).view(2, 3, 1, 1, 1, 1)).requires_grad_()
    torch.testing.assert_close(fused(xt), plain(xt))
    per_task = torch.stack([plain(xt[i, j]) for i in range(2) for j in range(3)]).view_as(xt)
    torch.testing.assert_close(fused(xt), per_task)
    gf = torch.autograd.grad((fused(xt) ** 3).sum(), [xt, fused.weight, fused.bias])
    gp = torch.autograd.grad((plain(xt) ** 3).sum(), [xt, plain.weight, plain.bias])
    for a, b in zip(gf, gp):
        torch.testing.assert_close(a, b)


# -- Conv-4 and ResNet-12 on colour images of any size ------------------------------------------------------
def test_conv4_on_84x84_colour_images_has_the_1600_d_embedding():
    net = Conv4((3, 84, 84), 0)
    assert net.embedding_dim == 64 * 5 * 5
    assert net(torch.zeros(1, 2, 3, 84, 84)).shape == (1, 2, 1600)
    assert Conv4((3, 32, 48), 5, channels=4)(torch.zeros(2, 3, 3, 32, 48)).shape == (2, 3, 5)  # not square


def test_resnet12_is_the_field_s_network_at_84x84():
    net = ResNet12((3, 84, 84), 0)
    assert [b.conv1.out_channels for b in net.blocks] == [64, 160, 320, 640]
    assert net.embedding_dim == 640 * 5 * 5  # 84 -> 42 -> 21 -> 10 -> 5, flattened (MetaOptNet)
    assert sum(p.numel() for p in net.parameters()) == 12_424_320  # convolutions without bias (12,414,848), their norms (9,472)
    assert ResNet12((3, 84, 84), 0, pool="avg").embedding_dim == 640
    x = torch.randn(1, 2, 3, 84, 84, generator=torch.Generator().manual_seed(SEED))
    assert net(x).shape == (1, 2, 16000)


def test_resnet12_block_structure_and_per_task_statistics():
    g = torch.Generator().manual_seed(SEED)
    net = ResNet12((3, 16, 16), 4, channels=(3, 4, 5, 6)).double()
    x = torch.randn(3, 5, 3, 16, 16, generator=g, dtype=torch.float64)
    batched = net(x)
    torch.testing.assert_close(batched, torch.stack([net(x[t]) for t in range(3)]))
    shifted = x.clone()
    shifted[0] *= 3.0
    torch.testing.assert_close(net(shifted)[1:], batched[1:])  # tasks never share statistics
    # one block by hand: three conv-norm-lrelu (the last without its lrelu), the 1x1 shortcut, lrelu, max-pool
    b = net.blocks[0]
    z = x[0]
    bn = torch.nn.functional.batch_norm
    def norm(m, t): return bn(t, None, None, m.weight, m.bias, training=True, eps=m.eps)
    a = torch.nn.functional.leaky_relu(norm(b.norm1, b.conv1(z)), 0.1)
    a = torch.nn.functional.leaky_relu(norm(b.norm2, b.conv2(a)), 0.1)
    a = norm(b.norm3, b.conv3(a)) + norm(b.norm_shortcut, b.shortcut(z))
    ref = torch.nn.functional.max_pool2d(torch.nn.functional.leaky_relu(a, 0.1), 2)
    torch.testing.assert_close(b(z, (5,)), ref)
    assert all(m.bias is None for m in net.modules() if isinstance(m, torch.nn.Conv2d))


def test_resnet12_fused_norm_and_plain_norm_agree():
    g = torch.Generator().manual_seed(SEED)
    with seeded_init(SEED):
        plain = ResNet12((3, 16, 16), 3, channels=(2, 3, 4, 5)).double()
    with seeded_init(SEED):
        fused = ResNet12((3, 16, 16), 3, channels=(2, 3, 4, 5), fused_norm=True).double()
    x = torch.randn(2, 4, 3, 16, 16, generator=g, dtype=torch.float64)
    torch.testing.assert_close(plain(x), fused(x))


def test_dropblock_only_with_a_generator_and_the_same_blocks_for_the_same_generator():
    net = ResNet12((3, 32, 32), 0, channels=(4, 4, 4, 4), dropblock=0.3, dropblock_size=2)
    x = torch.randn(1, 6, 3, 32, 32, generator=torch.Generator().manual_seed(SEED))
    plain = net(x)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    a = net(x, torch.Generator().manual_seed(SEED))
    b = net(x, torch.Generator().manual_seed(SEED))
    c = net(x, torch.Generator().manual_seed(SEED + 1))
    assert torch.equal(state, torch.get_rng_state()), "DropBlock used the global RNG"
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, plain)
    assert torch.equal(plain, net(x)), "without a generator nothing is dropped"
    y = drop_block(torch.ones(200, 1, 10, 10), 0.2, 3, generator=torch.Generator().manual_seed(SEED))
    dropped = float((y == 0).float().mean())
    assert 0.1 < dropped < 0.3, dropped  # about the rate asked for
    assert abs(float(y.mean()) - 1.0) < 1e-5  # kept units rescaled


def test_resnet12_shape_errors():
    with pytest.raises(ValueError, match="backbone 'resnet12' needs image inputs"):
        ResNet12((784,), 5)
    with pytest.raises(ValueError, match=r"too small for 4 pooling blocks \(at least 16 pixels a side\)"):
        ResNet12((3, 12, 12), 5)


def test_the_fast_max_pool_equals_max_pool2d_in_value_gradient_and_second_order():
    from metalens.nets import _MaxPool2

    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 5, 14, 12, generator=g, dtype=torch.float64)
    x[0, 0, :2, :2] = 1.0  # a window with ties: the gradient goes to the same element
    w = torch.randn(6, 5, 7, 6, generator=g, dtype=torch.float64)
    outs = []
    for pool in (lambda t: _MaxPool2.apply(t)[0], lambda t: torch.nn.functional.max_pool2d(t, 2)):
        xi = x.clone().requires_grad_(True)
        y = pool(xi)
        (gx,) = torch.autograd.grad((y * w).sum() + (y ** 2).sum(), xi, create_graph=True)
        (ggx,) = torch.autograd.grad((gx ** 2).sum(), xi)  # second order, as MAML's meta-gradient needs
        outs.append((y.detach(), gx.detach(), ggx))
    for a, b in zip(*outs):
        assert torch.equal(a, b)
