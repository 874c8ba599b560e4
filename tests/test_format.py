"""Format v1: the golden bytes of docs/FORMAT.md, round trips, the reference packer, and pack's errors."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import mosbits
from mosbits import reference
from mosbits.format import PackedSigns, row_bytes


def golden_weight():
    """The 3 x 37 worked example of docs/FORMAT.md."""
    w = np.ones((3, 37), dtype=np.float32)
    w[1] = np.where(np.arange(37) % 2 == 1, 1.0, -1.0)
    w[2] = -1.0
    w[2, 0], w[2, 9], w[2, 31], w[2, 36] = 0.0, -0.0, 3.0, 1e-30
    return w


GOLDEN_BYTES = np.array([
    [0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0x00, 0x00, 0x00],
    [0xAA, 0xAA, 0xAA, 0xAA, 0x0A, 0x00, 0x00, 0x00],
    [0x01, 0x02, 0x00, 0x80, 0x10, 0x00, 0x00, 0x00],
], dtype=np.uint8)


def test_golden_bytes():
    packed = mosbits.pack(golden_weight())
    assert packed.shape == (3, 37)
    np.testing.assert_array_equal(packed.data, GOLDEN_BYTES)
    np.testing.assert_array_equal(reference.pack(golden_weight()), GOLDEN_BYTES)
    assert packed.data.view("<u4")[2].tolist() == [0x80000201, 0x00000010]
    assert packed.nbytes == 24


def test_golden_bytes_torch():
    torch = pytest.importorskip("torch")
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        packed = mosbits.pack(torch.from_numpy(golden_weight()).to(dtype))
        assert packed.data.dtype == torch.uint8
        np.testing.assert_array_equal(packed.data.numpy(), GOLDEN_BYTES)


def test_zero_and_negative_zero_pack_as_plus_one():
    w = np.array([[0.0, -0.0, -1e-45, 1e-45]], dtype=np.float32)
    np.testing.assert_array_equal(mosbits.unpack(mosbits.pack(w)), [[1, 1, -1, 1]])


weights = st.tuples(st.integers(1, 20), st.integers(1, 200)).flatmap(
    lambda shape: hnp.arrays(np.float32, shape, elements=st.floats(-2, 2, width=32)))


@given(w=weights)
def test_pack_matches_reference_and_round_trips(w):
    packed = mosbits.pack(w).validate()
    np.testing.assert_array_equal(packed.data, reference.pack(w))
    signs = np.where(w >= 0, 1.0, -1.0)
    np.testing.assert_array_equal(mosbits.unpack(packed), signs)
    np.testing.assert_array_equal(reference.unpack(packed.data, packed.shape), signs)
    np.testing.assert_array_equal(mosbits.pack(mosbits.unpack(packed)).data, packed.data)


@given(w=weights)
def test_torch_pack_equals_numpy_pack(w):
    torch = pytest.importorskip("torch")
    packed = mosbits.pack(torch.from_numpy(w))
    np.testing.assert_array_equal(packed.data.numpy(), mosbits.pack(w).data)
    np.testing.assert_array_equal(mosbits.unpack(packed).numpy(), mosbits.unpack(mosbits.pack(w)))


@pytest.mark.parametrize(("k", "stride"), [(1, 4), (8, 4), (32, 4), (33, 8), (64, 8), (4096, 512), (11008, 1376)])
def test_row_stride_is_whole_words(k, stride):
    assert row_bytes(k) == stride
    assert mosbits.pack(np.ones((2, k), np.float32)).data.shape == (2, stride)


@pytest.mark.parametrize(("w", "error", "words"), [
    (np.array([[1.0, np.nan]], np.float32), ValueError, ["NaN/inf", "(0, 1)"]),
    (np.array([[1.0], [-np.inf]], np.float32), ValueError, ["NaN/inf", "(1, 0)"]),
    (np.ones((2, 3), np.int32), TypeError, ["float", "int32"]),
    (np.ones(5, np.float32), ValueError, ["2-D", "(5,)"]),
    (np.ones((2, 3, 4), np.float32), ValueError, ["2-D"]),
    (np.ones((0, 4), np.float32), ValueError, ["N, K >= 1"]),
    ([[1.0, 2.0]], TypeError, ["list"]),
], ids=["nan", "inf", "int", "1d", "3d", "empty", "list"])
def test_pack_rejects_bad_weights(w, error, words):
    with pytest.raises(error) as info:
        mosbits.pack(w)
    for word in words:
        assert word in str(info.value)


def test_torch_pack_rejects_nan_and_ints():
    torch = pytest.importorskip("torch")
    with pytest.raises(ValueError, match="NaN/inf"):
        mosbits.pack(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(TypeError, match="int64"):
        mosbits.pack(torch.ones(2, 3, dtype=torch.int64))


def test_packed_signs_checks_structure():
    data = np.zeros((3, 8), np.uint8)
    with pytest.raises(TypeError, match="uint8"):
        PackedSigns(data.astype(np.int8), (3, 37))
    with pytest.raises(ValueError, match=r"\(3, 4\)"):
        PackedSigns(np.zeros((3, 4), np.uint8), (3, 37))
    with pytest.raises(ValueError, match="N, K"):
        PackedSigns(data, (3,))


def test_validate_rejects_set_padding_bits():
    packed = mosbits.pack(golden_weight())
    data = packed.data.copy()
    data[1, 4] |= 0x20
    with pytest.raises(ValueError, match=r"padding bits after column K=37.*first row 1"):
        PackedSigns(data, (3, 37)).validate()
    data = packed.data.copy()
    data[2, 7] = 0x80
    with pytest.raises(ValueError, match="first row 2"):
        PackedSigns(data, (3, 37)).validate()
    assert PackedSigns(np.full((2, 4), 0xFF, np.uint8), (2, 32)).validate() is not None


def test_validate_torch_padding():
    torch = pytest.importorskip("torch")
    data = torch.from_numpy(GOLDEN_BYTES.copy())
    PackedSigns(data, (3, 37)).validate()
    data[0, 6] = 1
    with pytest.raises(ValueError, match="first row 0"):
        PackedSigns(data, (3, 37)).validate()
