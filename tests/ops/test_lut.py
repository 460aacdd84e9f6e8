"""T-MAC LUT family (arXiv 2407.00088): packing layout, dequantisation, tables, kernels, errors, opcheck."""

from __future__ import annotations

import pytest
import torch

from torchmerge.ops.lut import build_tables, lut_linear, lut_linear_reference, quantize_tables
from torchmerge.ops.lut_pack import (
    dequantize_lut_weights,
    from_blocks,
    pack_codes,
    pack_lut_weights,
    quantize_groups,
    row_of_position,
    unpack_codes,
)


def _data(n, k, m=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g), torch.randn(m, k, generator=g)


def test_row_positions_match_documented_layout():
    rows = row_of_position()
    # p = 16·lane + 8·h + j holds row 32·h + 8·lane + j
    assert [int(rows[p]) for p in (0, 7, 8, 16, 24, 40, 63)] == [0, 7, 32, 8, 40, 48, 63]
    assert sorted(rows.tolist()) == list(range(64))


def test_pack_codes_bit_layout_by_hand():
    # b = 1, 3 (plane-major): byte 64·i + p is bit-plane i of the 8 weights of row(p)
    q = torch.zeros(70, 16, dtype=torch.int64)
    q[40, 9] = 0b110  # row 40 = block 0, position 24; k = 9 = chunk 1, bit 1 (low nibble)
    q[65, 0] = 0b001  # row 65 = block 1, row 1 -> position 1; chunk 0, bit 0
    packed = pack_codes(q, 3)
    assert packed.shape == (2, 2, 3, 64) and packed.dtype == torch.uint8
    assert int(packed[0, 1, 1, 24]) == 0b10 and int(packed[0, 1, 2, 24]) == 0b10
    assert int(packed[1, 0, 0, 1]) == 1
    assert int(packed.to(torch.int64).sum()) == 0b10 + 0b10 + 1
    assert torch.equal(unpack_codes(packed, 3, 70), q)


def test_pack_codes_word_layout_by_hand():
    # b = 4: byte 64·⌊r/16⌋ + 4·(r mod 16) + i of a chunk is plane i of row r (low nibble k 0..3, high 4..7)
    q = torch.zeros(70, 16, dtype=torch.int64)
    q[40, 9] = 0b1010  # row 40: line 2, word 8 -> bytes 160 + i of chunk 1; k = 9: low nibble, bit 1
    q[3, 13] = 0b0100  # row 3: line 0, word 3 -> byte 12 + 2 of chunk 1; k = 13: high nibble, bit 1
    q[65, 0] = 0b0001  # block 1, row 1 -> byte 4 of chunk 0, bit 0
    packed = pack_codes(q, 4)
    assert packed.shape == (2, 2, 4, 64)
    flat = packed.reshape(2, 2, 256)
    assert int(flat[0, 1, 161]) == 0b10 and int(flat[0, 1, 163]) == 0b10
    assert int(flat[0, 1, 14]) == 0b10 << 4 and int(flat[1, 0, 4]) == 1
    assert int(packed.to(torch.int64).sum()) == 0b10 + 0b10 + (0b10 << 4) + 1
    assert torch.equal(unpack_codes(packed, 4, 70), q)
    # b = 2: byte 64·⌊r/32⌋ + 4·(r mod 16) + 2·a + i, low nibble for r mod 32 < 16, high otherwise
    q = torch.zeros(64, 8, dtype=torch.int64)
    q[49, 2] = 0b11  # row 49: line 1, word 1, high nibble; k = 2: half 0, bit 2 -> bytes 68, 69
    q[5, 6] = 0b10  # row 5: line 0, word 5, low nibble; k = 6: half 1, bit 2, plane 1 -> byte 23
    flat = pack_codes(q, 2).reshape(128)
    assert int(flat[68]) == int(flat[69]) == 0b100 << 4 and int(flat[23]) == 0b100
    assert int(flat.to(torch.int64).sum()) == 2 * (0b100 << 4) + 0b100
    assert torch.equal(unpack_codes(flat.reshape(1, 1, 2, 64), 2, 64), q)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("symmetric", [True, False])
def test_pack_round_trip_and_dequantisation(bits, symmetric):
    w, _ = _data(70, 128)
    packed = pack_lut_weights(w, bits, 32, symmetric)
    q, s, z = quantize_groups(w, bits, 32, symmetric)
    assert torch.equal(unpack_codes(packed.qweight, bits, 70), q)
    assert torch.equal(from_blocks(packed.scales, 70), s)
    deq = dequantize_lut_weights(*packed, bits, 32)
    want = ((q.float().reshape(70, 4, 32) - z[..., None]) * s[..., None]).reshape(70, 128)
    assert torch.equal(deq, want)
    if bits >= 2:  # within half a step inside the representable range
        step = s.repeat_interleave(32, dim=1)
        inside = (w >= deq.amin()) & (w <= deq.amax())
        assert ((deq - w).abs() <= step / 2 + 1e-6)[inside].all()


def test_symmetric_two_bit_is_ternary():
    w, _ = _data(64, 64)
    packed = pack_lut_weights(w, 2, 32, symmetric=True)
    deq = dequantize_lut_weights(*packed, 2, 32)
    s = from_blocks(packed.scales, 64).repeat_interleave(32, dim=1)
    assert set((deq / s).round().unique().tolist()) <= {-1.0, 0.0, 1.0}


def test_tables_are_eight_computed_eight_mirrored():
    _, x = _data(1, 64)
    t = build_tables(x)
    assert torch.equal(t[..., :8], -t[..., 8:].flip(-1))
    signs = torch.tensor([[1.0 if (i >> j) & 1 else -1.0 for j in range(4)] for i in range(16)])
    assert torch.allclose(t, x.reshape(3, 16, 1, 4).mul(signs).sum(-1), atol=1e-6)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("symmetric", [True, False])
def test_fp32_tables_equal_dequantise_then_matmul(isa, bits, symmetric):
    w, x = _data(100, 256, m=5, seed=bits)
    packed = pack_lut_weights(w, bits, 64, symmetric)
    want = x @ dequantize_lut_weights(*packed, bits, 64).t()
    torch.testing.assert_close(lut_linear(x, packed, bits, 64), want, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(lut_linear_reference(x, *packed, bits, 64), want, rtol=1e-5, atol=2e-5)



@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("k", [256, 16384])  # 16384: 4 MiB per dequantised block, one block per chunk
def test_fp32_tables_many_rows_equal_dequantise_then_matmul(bits, k):
    """From 128 activation rows the fp32-table op dequantises blocks and multiplies (csrc/lut.cpp): still
    the op's definition, and continuous with the lookup kernels just below the switch."""
    w, x = _data(130, k, m=128, seed=bits)  # 130 rows: a 2-row tail block
    b = torch.randn(130)
    for symmetric, sdt in ((True, torch.float16), (False, torch.float32)):
        packed = pack_lut_weights(w, bits, 32, symmetric, scale_dtype=sdt)
        want = x @ dequantize_lut_weights(*packed, bits, 32).t()
        got = lut_linear(x, packed, bits, 32, bias=b)
        grow = (k / 256) ** 0.5  # float summation error grows like sqrt(K)
        torch.testing.assert_close(got, want + b, rtol=1e-5 * grow, atol=2e-5 * grow)
        # the lookup kernels sum in table order (P/2 + c·Sx per group): a little more cancellation error
        torch.testing.assert_close(lut_linear(x[:127], packed, bits, 32), want[:127], rtol=1e-5 * grow, atol=5e-5 * grow)

@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("group", [32, 128])
def test_int8_tables_within_documented_bound(isa, bits, group):
    w, x = _data(64, 256, m=4, seed=group + bits)
    packed = pack_lut_weights(w, bits, group, symmetric=False)
    exact = lut_linear(x, packed, bits, group)
    got = lut_linear(x, packed, bits, group, int8_tables=True)
    _, ts = quantize_tables(build_tables(x), group)  # [M, K/G]
    s = from_blocks(packed.scales, 64).abs()  # [N, K/G]
    bound = (ts @ s.t()) * (2**bits - 1) * group / 16
    assert ((got - exact).abs() <= bound * 1.001 + 1e-4).all()
    assert (got - exact).abs().max() > 0  # the int8 path really quantises


@pytest.mark.parametrize(
    "case", ["n_tail", "bias_bf16", "fp16_scales", "one_row", "wide_group", "batched", "rows_b2", "rows_b4"]
)
@pytest.mark.parametrize("int8_tables", [False, True])
def test_kernel_matches_reference(isa, case, int8_tables):
    n, k, m, bits, group, sym, bias, sdt, xdt = 130, 256, 3, 3, 32, False, False, torch.float32, torch.float32
    if case == "bias_bf16":
        bias, xdt, bits = True, torch.bfloat16, 4
    elif case == "fp16_scales":
        sdt, bits, sym = torch.float16, 2, True
    elif case == "one_row":
        n, m, bits = 64, 1, 1
    elif case == "wide_group":
        k, group, bits = 2048, 1024, 4  # int16 partial sums are flushed inside a group
    elif case.startswith("rows_b"):  # the word layout with 1 and 2 activation rows per kernel pass
        bits, group, sym = int(case[-1]), 8, True
        for m_ in (1, 2):
            w, x = _data(n, k, m=m_, seed=m_)
            packed = pack_lut_weights(w, bits, group, sym)
            torch.testing.assert_close(lut_linear(x, packed, bits, group, int8_tables=int8_tables),
                                       lut_linear_reference(x, *packed, bits, group, int8_tables), rtol=1e-4, atol=1e-4)
        return
    w, x = _data(n, k, m=m, seed=len(case))
    packed = pack_lut_weights(w, bits, group, sym, scale_dtype=sdt)
    b = torch.randn(n) if bias else None
    x = x.to(xdt).reshape(3, 1, k) if case == "batched" else x.to(xdt)
    got = lut_linear(x, packed, bits, group, int8_tables=int8_tables, bias=b)
    want = lut_linear_reference(x, *packed, bits, group, int8_tables, b)
    assert got.dtype == xdt and got.shape == (*x.shape[:-1], n)
    tol = 2e-2 if xdt == torch.bfloat16 else 1e-4
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)



@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("symmetric", [True, False])
def test_word_kernels_bit_identical_across_avx512_tiers(bits, symmetric):
    """The VBMI kernel (vpermb, unmasked indices) and the VNNI one (vpshufb) make the same exact integer
    sums and the same float combine: equal bytes for 1..9 activation rows (tiles of 1-4 and tails)."""
    from torchmerge import ops

    if not ops.native_available():
        pytest.skip("torchmerge/_C.so not built")
    try:
        previous = ops.set_cpu_isa("avx512vbmi")
    except ValueError:
        pytest.skip("CPU lacks AVX512-VBMI")
    ops.set_cpu_isa(previous)
    w, x = _data(200, 512, m=9, seed=bits + symmetric)
    packed = pack_lut_weights(w, bits, 32, symmetric, scale_dtype=torch.float16)
    for m in range(1, 10):
        got = {}
        for tier in ("avx512vbmi", "avx512vnni"):
            previous = ops.set_cpu_isa(tier)
            try:
                got[tier] = lut_linear(x[:m], packed, bits, 32, int8_tables=True)
            finally:
                ops.set_cpu_isa(previous)
        assert torch.equal(got["avx512vbmi"], got["avx512vnni"]), m
        want = lut_linear_reference(x[:m], *packed, bits, 32, True)
        torch.testing.assert_close(got["avx512vbmi"], want, rtol=1e-4, atol=1e-4)

def test_zero_rows_and_zero_activations():
    w, _ = _data(64, 64)
    packed = pack_lut_weights(w, 4, 32)
    assert lut_linear(torch.zeros(0, 64), packed, 4, 32).shape == (0, 64)
    assert torch.equal(lut_linear(torch.zeros(2, 64), packed, 4, 32, int8_tables=True), torch.zeros(2, 64))


def _bad_calls():
    w, x = _data(64, 64, m=2)
    p = pack_lut_weights(w, 4, 32)
    pa = pack_lut_weights(w, 4, 32, symmetric=False)
    return [
        (lambda: lut_linear(x.long(), p, 4, 32), r"x must be a float32/bfloat16/float16"),
        (lambda: lut_linear(x, p, 5, 32), r"bits must be one of \(1, 2, 3, 4\)"),
        (lambda: lut_linear(x, p, 4, 12), r"group_size must be a positive multiple of 8 that divides K=64"),
        (lambda: lut_linear(x, p, 4, 48), r"group_size must be a positive multiple of 8 that divides K=64"),
        (lambda: lut_linear(x, p, 4, 64), r"scales must be .* shape \[ceil\(N/64\), K/group_size, 64\] = \[1, 1, 64\]"),
        (lambda: lut_linear(x, p._replace(scales=p.scales.double()), 4, 32), r"scales must be torch\.float32 or torch\.float16"),
        (lambda: lut_linear(x, p._replace(scales=p.scales[:, :1]), 4, 32), r"scales must be"),
        (lambda: lut_linear(x, p, 2, 32), r"qweight must be torch\.uint8 of shape \[ceil\(N/64\), K/8, bits, 64\]"),
        (lambda: lut_linear(x, p._replace(qweight=p.qweight.to(torch.int8)), 4, 32), r"qweight must be torch\.uint8"),
        (lambda: lut_linear(x, pa._replace(zeros=pa.zeros.half()), 4, 32), r"zeros must be None \(symmetric\) or"),
        (lambda: lut_linear(x, p, 4, 32, bias=torch.zeros(3)), r"bias must be None or a torch\.float32 tensor \[64\]"),
        (lambda: lut_linear(x, p._replace(out_features=0), 4, 32), r"out_features must be a positive int"),
        (lambda: lut_linear(x[:, :32], p, 4, 32), r"scales must be"),
        (lambda: pack_lut_weights(w, 0, 32), r"pack_lut_weights: bits must be one of \(1, 2, 3, 4\)"),
        (lambda: pack_lut_weights(w, 4, 20), r"pack_lut_weights: group_size must be a positive multiple of 8"),
        (lambda: pack_lut_weights(w[0], 4, 32), r"pack_lut_weights: w must be a 2-D floating-point tensor"),
        (lambda: pack_lut_weights(w, 4, 32, scale_dtype=torch.bfloat16), r"scale_dtype must be torch\.float32 or"),
        (lambda: pack_lut_weights(w * 1e9, 4, 32, scale_dtype=torch.float16), r"overflows"),
    ]


@pytest.mark.parametrize("index", range(len(_bad_calls())))
def test_bad_input_raises_value_error(index):
    call, match = _bad_calls()[index]
    with pytest.raises(ValueError, match=match):
        call()


def test_raw_op_raises_value_error_too():
    w, x = _data(64, 64, m=2)
    p = pack_lut_weights(w, 4, 32)
    with pytest.raises(ValueError, match="bits must be one of"):
        torch.ops.torchmerge.lut_linear(x, p.qweight, p.scales, None, 64, 7, 32, False, None)
    with pytest.raises(ValueError, match="group_size"):
        torch.ops.torchmerge.lut_linear(x, p.qweight, p.scales, None, 64, 4, 24, False, None)


def test_opcheck():
    w, x = _data(70, 64, m=3)
    for sym, int8_tables, bias in ((True, False, None), (False, True, torch.randn(70))):
        p = pack_lut_weights(w, 2, 32, symmetric=sym)
        args = (x, p.qweight, p.scales, p.zeros, p.out_features, 2, 32, int8_tables, bias)
        torch.library.opcheck(torch.ops.torchmerge.lut_linear.default, args)
