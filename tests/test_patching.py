"""Patchify / unpatchify layout (channel last, row-major) and the audio token order f * 26 + t."""

import pytest
import torch

from tgdp.configs import paper
from tgdp.patching import audio_as_image, image_as_audio, patchify, unpatchify


def test_audio_patch_at_mel_80_95_frames_48_63_is_token_133():
    m = paper().model
    audio = torch.zeros(1, m.audio_length, m.n_mels)
    audio[0, 48:64, 80:96] = 1.0                    # [B, T, F]: frames 48-63, mel bins 80-95
    patches = patchify(audio_as_image(audio), m.patch_size)
    assert patches.shape == (1, m.num_patches_a, m.patch_dim_a) == (1, 208, 256)
    nz = patches.abs().sum(-1)[0].nonzero().flatten().tolist()
    assert nz == [133] == [5 * 26 + 3]


def test_patch_vector_is_row_col_channel():
    p, c, h, w = 4, 3, 8, 12
    img = torch.arange(c * h * w, dtype=torch.float32).reshape(1, c, h, w)
    x = patchify(img, p)
    gw = w // p
    for token in (0, 4, 5):
        gr, gc = divmod(token, gw)
        for (r, q, ch) in ((0, 0, 0), (1, 2, 1), (3, 3, 2)):
            want = img[0, ch, gr * p + r, gc * p + q]
            assert x[0, token, (r * p + q) * c + ch] == want


@pytest.mark.parametrize("shape, p", [((2, 3, 32, 48), 16), ((1, 1, 128, 416), 16), ((3, 2, 6, 9), 3)])
def test_round_trip(shape, p):
    img = torch.randn(shape)
    x = patchify(img, p)
    back = unpatchify(x, p, (shape[2] // p, shape[3] // p), shape[1])
    assert torch.equal(back, img)


def test_audio_view_round_trip_and_is_a_view():
    a = torch.randn(2, 32, 16)
    img = audio_as_image(a)
    assert img.shape == (2, 1, 16, 32) and img.data_ptr() == a.data_ptr()
    assert torch.equal(image_as_audio(img), a)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="not divisible"):
        patchify(torch.zeros(1, 1, 20, 32), 16)
    with pytest.raises(ValueError, match=r"\[B, T, F\]"):
        audio_as_image(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="expected"):
        unpatchify(torch.zeros(1, 5, 16), 4, (2, 2), 1)
