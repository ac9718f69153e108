"""The image and text networks: shapes, packing, teacher forcing, the sparse text loss, decoding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mvae_course.config import ModelConfig, preset
from mvae_course.data.text import BOS, EOS, PAD, UNK
from mvae_course.models.image import (
    ImageDecoder,
    ImageEncoder,
    SubPixelConvTranspose2d,
    conv_output_size,
    subpixel_kernel,
)
from mvae_course.models.text import TextDecoder, TextEncoder, filter_logits, shift_right, word_dropout

VOCAB = 30


def tiny_config(**changes) -> ModelConfig:
    config = preset("tiny").model
    config.vocab_size = VOCAB
    for key, value in changes.items():
        setattr(config, key, value)
    return config


def caption_batch(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """B x T captions following the batch contract: content ids, EOS, then PAD."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    text = torch.randint(UNK + 1, VOCAB, (len(lengths), T), generator=g)
    for i, n in enumerate(lengths):
        text[i, n - 1] = EOS
        text[i, n:] = PAD
    return text, torch.tensor(lengths)


# --- image ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("size", "kernel", "stride", "padding", "expected"), [
    (64, 4, 2, 1, 32), (32, 4, 2, 1, 16), (8, 4, 2, 1, 4),
    (5, 3, 1, 1, 5), (28, 5, 1, 0, 24), (7, 3, 2, 1, 4),
])
def test_conv_output_size_matches_torch(size, kernel, stride, padding, expected):
    assert conv_output_size(size, kernel, stride, padding) == expected
    conv = nn.Conv2d(1, 1, kernel, stride, padding)
    assert conv(torch.zeros(1, 1, size, size)).shape[-1] == expected


@pytest.mark.parametrize(("image_size", "channels", "side"), [(32, (8, 16, 32), 4), (64, (32, 64, 128), 8)])
def test_image_encoder_decoder_shapes(image_size, channels, side):
    config = tiny_config(image_size=image_size, image_channels=channels)
    encoder, decoder = ImageEncoder(config), ImageDecoder(config)
    image = torch.rand(5, 3, image_size, image_size)
    assert encoder.conv(image).shape == (5, channels[-1], side, side)
    mu, logvar = encoder(image)
    assert mu.shape == logvar.shape == (5, config.z_dim)
    assert decoder(mu).shape == (5, 3, image_size, image_size)
    k_by_b = torch.randn(7, 5, config.z_dim)  # K x B latents
    assert decoder(k_by_b).shape == (7, 5, 3, image_size, image_size)


@pytest.mark.parametrize(("c_in", "c_out", "height", "width"), [(16, 3, 16, 16), (4, 6, 5, 3), (1, 1, 1, 1)])
def test_subpixel_transposed_convolution_is_the_transposed_convolution(c_in, c_out, height, width):
    torch.manual_seed(0)
    layer = SubPixelConvTranspose2d(c_in, c_out).double()
    x = torch.randn(2, c_in, height, width, dtype=torch.float64, requires_grad=True)
    got = layer(x)
    expected = F.conv_transpose2d(x, layer.weight, layer.bias, stride=2, padding=1)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    grad_out = torch.randn_like(expected)
    grads = torch.autograd.grad(got, (x, layer.weight, layer.bias), grad_out)
    expected_grads = torch.autograd.grad(expected, (x, layer.weight, layer.bias), grad_out)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-12)
    # every one of the 4 x 4 taps is used by exactly one output parity, and nothing else enters the kernel
    kernel = subpixel_kernel(layer.weight)
    assert kernel.shape == (4 * c_out, c_in, 3, 3)
    assert torch.equal(kernel.abs().sum().detach(), layer.weight.abs().sum().detach())
    assert int((kernel != 0).sum()) == int((layer.weight != 0).sum())


def test_the_subpixel_layer_has_a_transposed_convolutions_parameters_and_initialisation():
    torch.manual_seed(3)
    subpixel = SubPixelConvTranspose2d(16, 3)
    torch.manual_seed(3)
    plain = nn.ConvTranspose2d(16, 3, kernel_size=4, stride=2, padding=1)
    assert subpixel.state_dict().keys() == plain.state_dict().keys()  # shipped weights load as they are
    for name, value in plain.state_dict().items():
        assert torch.equal(subpixel.state_dict()[name], value), name  # a seed trains the same network
    assert isinstance(ImageDecoder(tiny_config()).deconv[-1], SubPixelConvTranspose2d)


def test_image_size_that_does_not_halve_is_an_error():
    with pytest.raises(ValueError, match="image_size=36"):
        ImageEncoder(tiny_config(image_size=36))


# --- text encoder -----------------------------------------------------------------------------------


def test_text_encoder_ignores_padding():
    encoder = TextEncoder(tiny_config()).eval()
    text, lengths = caption_batch([6, 3, 1, 4])
    mu, logvar = encoder(text, lengths)
    assert mu.shape == logvar.shape == (4, tiny_config().z_dim)
    longer = torch.cat([text, torch.full((4, 5), PAD)], dim=1)  # extra PAD columns
    garbage = longer.clone()
    garbage[garbage == PAD] = 7  # whatever sits past the lengths is never read
    for other in (longer, garbage):
        mu2, logvar2 = encoder(other, lengths)
        torch.testing.assert_close(mu2, mu)
        torch.testing.assert_close(logvar2, logvar)


def test_text_encoder_rejects_bad_lengths():
    encoder = TextEncoder(tiny_config())
    text, _ = caption_batch([3, 2])
    with pytest.raises(ValueError, match="lengths"):
        encoder(text, torch.tensor([4, 2]))
    with pytest.raises(ValueError, match="vocab_size"):
        TextEncoder(tiny_config(vocab_size=0))


# --- text decoder: teacher forcing and the sparse loss -----------------------------------------------


def test_shift_right_starts_with_bos():
    text, lengths = caption_batch([4, 2])
    inputs = shift_right(text)
    assert (inputs[:, 0] == BOS).all()
    assert torch.equal(inputs[:, 1:], text[:, :-1])


def test_hidden_states_are_taken_at_real_positions_with_eos_last():
    config = tiny_config()
    decoder = TextDecoder(config).eval()
    text, lengths = caption_batch([5, 2, 3])
    h, targets, row = decoder.hidden_states(torch.randn(3, config.z_dim), text, lengths)
    assert h.shape == (int(lengths.sum()), config.dec_hidden)
    assert torch.equal(row, torch.tensor([0] * 5 + [1] * 2 + [2] * 3))
    assert torch.equal(targets, text[text != PAD])
    last = torch.cumsum(lengths, 0) - 1
    assert (targets[last] == EOS).all()
    assert not (targets == PAD).any()


def test_decoder_states_do_not_see_what_follows_a_caption():
    """The decoder's GRU runs over the padded batch: being causal, what follows a caption's EOS (padding,
    or anything else, and however many columns of it) never changes the states of its real tokens."""
    config = tiny_config()
    decoder = TextDecoder(config).eval()
    text, lengths = caption_batch([5, 2, 3], seed=4)
    z = torch.randn(3, config.z_dim)
    after = torch.arange(text.shape[1] + 3) >= lengths.unsqueeze(1)  # B x (T + 3): past each caption
    garbage = torch.randint(UNK + 1, VOCAB, after.shape).masked_fill(~after, 0)
    longer = torch.cat([text, torch.full((3, 3), PAD)], dim=1).where(~after, garbage)
    h, targets, row = decoder.hidden_states(z, text, lengths)
    h_longer, targets_longer, row_longer = decoder.hidden_states(z, longer, lengths)
    torch.testing.assert_close(h_longer, h)
    assert torch.equal(targets_longer, targets) and torch.equal(row_longer, row)


def test_word_dropout_replaces_words_but_not_bos_or_pad():
    inputs = shift_right(caption_batch([5, 2, 3])[0])
    all_dropped = word_dropout(inputs, 1.0)
    keep = (inputs == BOS) | (inputs == PAD)
    assert torch.equal(all_dropped[keep], inputs[keep])
    assert (all_dropped[~keep] == UNK).all()
    assert torch.equal(word_dropout(inputs, 0.0), inputs)


def test_word_dropout_only_in_training():
    config = tiny_config(word_dropout=1.0)
    decoder = TextDecoder(config)
    text, lengths = caption_batch([5, 2, 3])
    z = torch.randn(3, config.z_dim)
    # What the inputs become: every word UNK (an EOS input only ever sits past its length, unread).
    unk_text = torch.where((text == PAD) | (text == EOS), text, torch.full_like(text, UNK))
    train_ll = decoder.train().log_likelihood(z, text, lengths)
    h, targets, row = decoder.eval().hidden_states(z, unk_text, lengths)
    expected = -F.cross_entropy(decoder.out(h), text[text != PAD], reduction="none")
    torch.testing.assert_close(train_ll, torch.zeros(3).index_add_(0, row, expected))
    assert not torch.allclose(decoder.log_likelihood(z, text, lengths), train_ll)


def test_sparse_loss_equals_full_logits_cross_entropy():
    config = tiny_config()
    decoder = TextDecoder(config).eval()
    text, lengths = caption_batch([6, 1, 4, 3], seed=3)
    z = torch.randn(4, config.z_dim)
    # The naive way: run the GRU over the whole padded batch and score every position, ignoring PAD.
    inputs = shift_right(text)
    x = torch.cat([decoder.embedding(inputs), z.unsqueeze(1).expand(-1, text.shape[1], -1)], dim=-1)
    out, _ = decoder.gru(x, decoder.initial_state(z))
    logits = decoder.out(out)  # B x T x V
    naive = F.cross_entropy(logits.transpose(1, 2), text, ignore_index=PAD, reduction="none").sum(1)
    torch.testing.assert_close(-decoder.log_likelihood(z, text, lengths), naive)


def test_log_likelihood_gradients_reach_z():
    config = tiny_config()
    decoder = TextDecoder(config)
    text, lengths = caption_batch([3, 2])
    z = torch.randn(2, config.z_dim, requires_grad=True)
    decoder.log_likelihood(z, text, lengths).sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


# --- text decoder: generation -----------------------------------------------------------------------


@pytest.mark.parametrize("method", ["greedy", "sample", "beam"])
def test_generation_never_emits_pad_or_bos_and_stops_at_eos(method):
    config = tiny_config()
    decoder = TextDecoder(config).eval()
    z = torch.randn(3, config.z_dim)
    with torch.no_grad():
        decoder.out.bias[[PAD, BOS]] = 100.0  # the most likely tokens, yet forbidden
        decoder.out.bias[5] = 50.0
    captions = decoder.generate(z, max_len=6, method=method)
    assert captions == [[5] * 6] * 3  # no EOS within max_len: cut at max_len
    with torch.no_grad():
        decoder.out.bias[EOS] = 60.0
    assert decoder.generate(z, max_len=6, method=method) == [[], [], []]  # EOS first, never in the output


def test_batched_greedy_equals_one_caption_at_a_time():
    config = tiny_config()
    torch.manual_seed(2)
    decoder = TextDecoder(config).eval()
    with torch.no_grad():
        decoder.out.bias[EOS] += 0.5  # so that captions end at different lengths
    z = 3 * torch.randn(8, config.z_dim)
    batched = decoder.generate(z, max_len=12, method="greedy")
    with torch.no_grad():
        for i in range(8):  # the reference: one latent, stop at its own EOS
            token, h, caption = torch.tensor([BOS]), decoder.initial_state(z[i : i + 1]), []
            for _ in range(12):
                logits, h = decoder.step(token, h, z[i : i + 1])
                token = logits.argmax(-1)
                if token.item() == EOS:
                    break
                caption.append(token.item())
            assert batched[i] == caption
    assert len({len(c) for c in batched}) > 1, "test needs captions of different lengths"
    others = ({"method": "sample", "temperature": 2.0, "top_p": 0.9}, {"method": "beam", "length_norm": True})
    for kwargs in others:
        for caption in decoder.generate(z, max_len=12, **kwargs):
            assert len(caption) <= 12 and not {PAD, BOS, EOS} & set(caption)


def test_beam_size_one_equals_greedy():
    config = tiny_config()
    torch.manual_seed(0)
    decoder = TextDecoder(config).eval()
    z = 3 * torch.randn(12, config.z_dim)
    greedy = decoder.generate(z, max_len=10, method="greedy")
    assert decoder.generate(z, max_len=10, method="beam", beam_size=1) == greedy
    assert decoder.generate(z, max_len=10, method="sample", top_k=1) == greedy


def test_beam_search_scores_at_least_greedy_on_average():
    config = tiny_config()
    torch.manual_seed(2)
    decoder = TextDecoder(config).eval()
    with torch.no_grad():
        decoder.out.bias[EOS] += 0.5
    z = 3 * torch.randn(16, config.z_dim)
    max_len = 20

    def log_prob(captions: list[list[int]]) -> torch.Tensor:
        """log p(caption | z), with EOS scored where the caption ended before max_len."""
        text = [torch.tensor(c + [EOS] if len(c) < max_len else c) for c in captions]
        padded = torch.nn.utils.rnn.pad_sequence(text, batch_first=True, padding_value=PAD)
        return decoder.log_likelihood(z, padded, torch.tensor([len(t) for t in text]))

    with torch.no_grad():
        greedy = log_prob(decoder.generate(z, max_len=max_len, method="greedy"))
        beam = log_prob(decoder.generate(z, max_len=max_len, method="beam", beam_size=5))
    assert beam.mean() > greedy.mean()


def test_filter_logits():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    assert torch.equal(filter_logits(logits), logits)
    top2 = filter_logits(logits, top_k=2)
    assert torch.isinf(top2).tolist() == [[True, False, False, True]]
    nucleus = filter_logits(logits, top_p=0.5)  # softmax: [.09, .64, .24, .03]: the top token reaches 0.5
    assert torch.isinf(nucleus).tolist() == [[True, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.8)).tolist() == [[True, False, False, True]]


def test_generate_rejects_unknown_method():
    decoder = TextDecoder(tiny_config())
    with pytest.raises(ValueError, match="method"):
        decoder.generate(torch.randn(1, decoder.init_hidden.in_features), method="topk")
