"""The caption encoder q(z | y) and the autoregressive decoder p(y | z).

Taught in notebooks/03_text_vae.ipynb

A batch caption is its content ids, one EOS, then PAD (docs/architecture.md). The encoder runs its
bidirectional GRU on a packed sequence, so that the backward direction starts at each caption's last real
token. The decoder is trained with teacher forcing: it reads [BOS] + caption[:-1] and predicts the caption,
EOS last. Its GRU is causal, so it runs over the padded batch (padding comes after every real token and
cannot change a real position's state), and its vocabulary projection, the largest layer of the model, runs
only at the N real token positions of the batch (an N x V matrix, never B x T x V).

Speed on a CPU (benchmarks/README.md): a packed GRU's backward pass writes a zero gradient the size of the
whole sequence at every time step, so the padded decoder is faster although it runs the padding; under
bf16 autocast the encoder's GRU stays fp32 on a CPU, where casting its small hidden state at every time step
costs more than bf16 saves. Both networks hand back fp32 (log-likelihoods, mu and logvar).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence

from mvae_course.config import ModelConfig
from mvae_course.device import full_precision
from mvae_course.data.text import BOS, EOS, PAD, UNK
from mvae_course.objectives import text_log_likelihood

DECODE_METHODS = ("greedy", "sample", "beam")


def check_lengths(text: Tensor, lengths: Tensor) -> None:
    """Fail early, with a useful message, on a text batch that breaks the batch contract.

    text: B x T, lengths: B, each in [1, T].
    """
    if text.dim() != 2 or lengths.shape != text.shape[:1]:
        raise ValueError(
            f"text must be B x T and lengths B, got {tuple(text.shape)} and {tuple(lengths.shape)}"
        )
    if bool((lengths < 1).any()) or bool((lengths > text.shape[1]).any()):
        raise ValueError(
            f"lengths must be in [1, T={text.shape[1]}] (content ids + EOS per caption), "
            f"got {lengths.tolist()}; build batches with the loaders in mvae_course.data"
        )


def shift_right(text: Tensor) -> Tensor:
    """Teacher-forcing inputs: [BOS] + text[:, :-1], so position t reads token t - 1 and predicts token t.

    Taught in notebooks/03_text_vae.ipynb

    text: B x T (content ids, EOS, PAD). Returns B x T.
    """
    bos = torch.full_like(text[:, :1], BOS)
    return torch.cat([bos, text[:, :-1]], dim=1)


def word_dropout(inputs: Tensor, p: float, generator: torch.Generator | None = None) -> Tensor:
    """Replace each decoder input token (not BOS, not PAD) by UNK with probability p (Bowman et al., 2016).

    Taught in notebooks/03_text_vae.ipynb

    inputs: B x T. Returns B x T. A decoder that cannot always see the previous word must lean on z,
    a remedy for posterior collapse.
    """
    drop = torch.rand(inputs.shape, generator=generator, device=inputs.device) < p
    drop &= (inputs != BOS) & (inputs != PAD)
    return inputs.masked_fill(drop, UNK)


def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Keep the top-k tokens and/or the smallest set whose probability reaches top_p; the rest get -inf.

    Taught in notebooks/03_text_vae.ipynb

    logits: B x V. Returns B x V. top_k = 0 and top_p = 1.0 leave the logits unchanged. The most likely
    token always survives.
    """
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # B x 1
        logits = logits.masked_fill(logits < kth, -torch.inf)
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        before = probs.cumsum(-1) - probs  # probability mass of the tokens ranked above each one
        sorted_logits = sorted_logits.masked_fill(before >= top_p, -torch.inf)
        logits = torch.full_like(logits, -torch.inf).scatter(-1, order, sorted_logits)
    return logits


def _content(ids: list[int]) -> list[int]:
    """Generated ids up to (not including) the first EOS."""
    return ids[: ids.index(EOS)] if EOS in ids else ids


def check_vocab_size(config: ModelConfig) -> None:
    """A clear error for a text network built before the vocabulary size was set from the tokenizer."""
    if config.vocab_size <= UNK:
        raise ValueError(
            f"ModelConfig.vocab_size is {config.vocab_size}; set it from the tokenizer "
            "(len(tokenizer)) before building the model"
        )


class TextEncoder(nn.Module):
    """q(z | y): embeddings and a bidirectional GRU over the packed caption; its two final states give
    mu and logvar.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        check_vocab_size(config)
        self.embedding = nn.Embedding(config.vocab_size, config.emb_dim, padding_idx=PAD)
        self.gru = nn.GRU(config.emb_dim, config.enc_hidden, batch_first=True, bidirectional=True)
        self.to_params = nn.Linear(2 * config.enc_hidden, 2 * config.z_dim)

    def forward(self, text: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """text: B x T, lengths: B. Returns mu, logvar: B x z_dim each."""
        check_lengths(text, lengths)
        emb = self.embedding(text)  # B x T x emb_dim
        packed = pack_padded_sequence(emb, lengths.cpu(), batch_first=True, enforce_sorted=False)
        with torch.autocast("cpu", enabled=False):  # fp32 on a CPU (see above); CUDA autocast is untouched
            # h: 2 x B x enc_hidden, the forward state after the last real token, the backward after the first
            _, h = self.gru(packed)
        h = torch.cat([h[0], h[1]], dim=-1)  # B x 2 enc_hidden
        mu, logvar = full_precision(self.to_params(h)).chunk(2, dim=-1)
        return mu, logvar


class TextDecoder(nn.Module):
    """p(y | z) = prod_t p(y_t | y_<t, z): a GRU whose initial state comes from z and which also reads z
    at every step, so the latent cannot be forgotten along the caption.

    Taught in notebooks/03_text_vae.ipynb
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        check_vocab_size(config)
        self.embedding = nn.Embedding(config.vocab_size, config.emb_dim, padding_idx=PAD)
        self.init_hidden = nn.Linear(config.z_dim, config.dec_hidden)
        self.gru = nn.GRU(config.emb_dim + config.z_dim, config.dec_hidden, batch_first=True)
        self.out = nn.Linear(config.dec_hidden, config.vocab_size)
        self.word_dropout = config.word_dropout
        self.max_len = config.max_caption_len

    def initial_state(self, z: Tensor) -> Tensor:
        """z: B x z_dim. Returns the GRU's initial hidden state, 1 x B x dec_hidden."""
        return torch.tanh(self.init_hidden(z)).unsqueeze(0)

    def hidden_states(self, z: Tensor, text: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Teacher-forced GRU states at the real token positions only.

        Taught in notebooks/03_text_vae.ipynb

        z: B x z_dim, text: B x T, lengths: B. Returns h: N x dec_hidden (the state that predicts each
        real token), targets: N (that token) and row: N (its sample), N = lengths.sum().
        """
        check_lengths(text, lengths)
        text = text[:, : int(lengths.max())]  # B x T: padding past the longest caption is never run
        inputs = shift_right(text)  # B x T, starts with BOS
        if self.training and self.word_dropout > 0:
            inputs = word_dropout(inputs, self.word_dropout)
        T = text.shape[1]
        x = torch.cat([self.embedding(inputs), z.unsqueeze(1).expand(-1, T, -1)], dim=-1)  # B x T x (emb + z)
        out, _ = self.gru(x, self.initial_state(z))  # B x T x H; causal: padding never reaches a real state
        real = torch.arange(T, device=text.device) < lengths.to(text.device).unsqueeze(1)  # B x T
        row = torch.arange(text.shape[0], device=text.device).unsqueeze(1).expand(-1, T)
        return out[real], text[real], row[real]  # N x H, N, N

    def log_likelihood(self, z: Tensor, text: Tensor, lengths: Tensor) -> Tensor:
        """log p(y | z) per caption, summed over its real tokens (EOS included).

        Taught in notebooks/03_text_vae.ipynb

        z: B x z_dim, text: B x T, lengths: B. Returns B.
        """
        h, targets, row = self.hidden_states(z, text, lengths)
        logits = full_precision(self.out(h))  # N x V, only where there is a real token; fp32 for the softmax
        return text_log_likelihood(logits, targets, row, text.shape[0])

    def step(self, tokens: Tensor, h: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
        """One decoding step. tokens: B (the previous token), h: 1 x B x H, z: B x z_dim.

        Taught in notebooks/03_text_vae.ipynb

        Returns logits: B x V with PAD and BOS at -inf (never generated), and the new h.
        """
        x = torch.cat([self.embedding(tokens), z], dim=-1).unsqueeze(1)  # B x 1 x (emb + z)
        out, h = self.gru(x, h)
        logits = full_precision(self.out(out[:, 0]))  # B x V
        logits[:, [PAD, BOS]] = -torch.inf
        return logits, h

    @torch.no_grad()
    def generate(
        self,
        z: Tensor,
        max_len: int | None = None,
        method: str = "greedy",
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        beam_size: int = 4,
        length_norm: bool = False,
    ) -> list[list[int]]:
        """Captions for a batch of latents, as content ids (no BOS, EOS or PAD).

        Taught in notebooks/03_text_vae.ipynb

        z: B x z_dim. max_len: most tokens generated per caption, EOS included (default
        config.max_caption_len). method: "greedy" (argmax), "sample" (from softmax(logits / temperature),
        optionally restricted by top_k / top_p) or "beam" (beam search with `beam_size` beams; with
        `length_norm` the final choice divides each beam's log-probability by its length).
        """
        if method not in DECODE_METHODS:
            raise ValueError(f"method must be one of {DECODE_METHODS}, got {method!r}")
        max_len = self.max_len if max_len is None else max_len
        if method == "beam":
            return self._beam_search(z, max_len, beam_size, length_norm)
        B = z.shape[0]
        tokens = torch.full((B,), BOS, dtype=torch.long, device=z.device)
        h = self.initial_state(z)
        finished = torch.zeros(B, dtype=torch.bool, device=z.device)
        generated = []
        for _ in range(max_len):
            logits, h = self.step(tokens, h, z)
            if method == "greedy":
                tokens = logits.argmax(-1)
            else:
                probs = torch.softmax(filter_logits(logits / temperature, top_k, top_p), dim=-1)
                tokens = torch.multinomial(probs, 1).squeeze(1)
            tokens = tokens.masked_fill(finished, EOS)  # a finished caption stays finished
            generated.append(tokens)
            finished |= tokens == EOS
            if bool(finished.all()):
                break
        ids = torch.stack(generated, dim=1).tolist()  # B x L
        return [_content(row) for row in ids]

    def _beam_search(self, z: Tensor, max_len: int, beam_size: int, length_norm: bool) -> list[list[int]]:
        """Batched beam search: B x beam_size hypotheses advance together; finished ones keep their score."""
        V = self.out.out_features
        B, K = z.shape[0], min(beam_size, V - 2)  # PAD and BOS can never extend a beam
        z = z.repeat_interleave(K, dim=0)  # (B K) x z_dim, the K beams of a sample are adjacent
        h = self.initial_state(z)  # 1 x (B K) x H
        tokens = torch.full((B * K,), BOS, dtype=torch.long, device=z.device)
        scores = torch.full((B, K), -torch.inf, device=z.device)
        scores[:, 0] = 0.0  # all beams start identical: expand only the first one at step one
        history = torch.empty(B, K, 0, dtype=torch.long, device=z.device)
        finished = torch.zeros(B, K, dtype=torch.bool, device=z.device)
        stay = torch.full((V,), -torch.inf, device=z.device)
        stay[EOS] = 0.0  # a finished beam can only repeat EOS, at no cost
        for t in range(max_len):
            logits, h = self.step(tokens, h, z)
            log_p = torch.log_softmax(logits, dim=-1).view(B, K, V)
            log_p = torch.where(finished.unsqueeze(-1), stay, log_p)
            scores, index = (scores.unsqueeze(-1) + log_p).view(B, K * V).topk(K, dim=-1)  # B x K
            beam, token = index // V, index % V  # which beam each survivor extends, with which token
            history = history.gather(1, beam.unsqueeze(-1).expand(-1, -1, t))  # B x K x t, the kept prefixes
            history = torch.cat([history, token.unsqueeze(-1)], dim=-1)
            finished = finished.gather(1, beam) | (token == EOS)
            H = h.shape[-1]
            h = h.view(B, K, H).gather(1, beam.unsqueeze(-1).expand(-1, -1, H)).view(1, B * K, H)
            tokens = token.view(-1)
            if bool(finished.all()):
                break
        if length_norm:
            is_eos = history == EOS
            length = torch.where(is_eos.any(-1), is_eos.int().argmax(-1) + 1, history.shape[-1])  # B x K
            scores = scores / length
        best = scores.argmax(-1)  # B
        ids = history[torch.arange(B, device=z.device), best].tolist()
        return [_content(row) for row in ids]
