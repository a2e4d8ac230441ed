"""All4One (Estepa et al. 2023), methods.md §2.6: NNCLR's neighbour contrast, a centroid contrast of
transformer summaries of neighbours, and a feature-decorrelation term, with a momentum encoder.

For each view v: m_v = momentum projection (normalised), nn_v = its 5 nearest neighbours in the
support set (nearest first), z_v = online projection, p_v / p'_v = predictor 1 / 2 outputs.
- neighbour term: ½·[InfoNCE(nn1[0] → p2) + InfoNCE(nn2[0] → p1)] at τ (per image);
- centroid term: r_v = T(nn_v)[0], s_v = T([p'_v, nn_v[0..3]])[0] (T: transformer over 5 tokens
  plus a positional encoding, see `solo_positions`), ½·[InfoNCE(r1 → s2) + InfoNCE(r2 → s1)] at
  τ_centroid (per image);
- feature term (batch level): C_a = n(m1)ᵀ n(z2), C_b = n(m2)ᵀ n(z1) with n normalising each
  feature over the global batch; 10·(½·√(mean over both of (diag − 1)²) + ½·√(mean over both of offdiag²)).
Total 0.5·centroid + 0.5·neighbour (per image) + 0.5·feature (batch). Candidates, the feature
term's batch and the support set are all global (gathered from every rank).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from harness.core import distributed
from harness.core.method import LossParts, mlp
from methods.common import (
    Queue,
    full_precision,
    keep_queues_out_of_ddp_broadcast,
    momentum_copy,
    momentum_tau,
    nn_infonce_pairs,
    synthetic_positive_pairs,
    update_momentum_encoder,
)
from methods.nnclr import nnclr_pairs


def sinusoidal_positions(tokens: int, dim: int) -> torch.Tensor:
    """The textbook sine/cosine encoding of token positions 0..tokens−1 (Vaswani et al.): (tokens, dim).

    ``positional_encoding: textbook``. Not what solo-learn's All4One adds (see `solo_positions`).
    """
    position = torch.arange(tokens, dtype=torch.float32)[:, None]
    freq = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    enc = torch.zeros(tokens, dim)
    enc[:, 0::2] = torch.sin(position * freq)
    enc[:, 1::2] = torch.cos(position * freq)[:, : dim // 2]
    return enc


def solo_positions(tokens: int, dim: int) -> torch.Tensor:
    """The encoding solo-learn's All4One adds to its (n, tokens, dim) sequences: (tokens, dim).

    ``positional_encoding: solo`` (the default). solo-learn wraps the positional-encodings package's
    1-D encoding in its "permute" form, built for 5 channels, and applies it to the (n, 5, d)
    sequence. That form moves axis 1 last before encoding, so the d feature indices are the
    positions and the 5 tokens are the channels: token j, at feature x, gets sin(x·ω_⌊j/2⌋) for
    even j and cos(x·ω_⌊j/2⌋) for odd j, with ω_i = 10000^(−2i/C) and C = tokens rounded up to
    an even number (6 for 5 tokens: ω ∈ {1, 1e4^(−1/3), 1e4^(−2/3)}). So token 0 gets sin(x),
    token 1 cos(x), token 4 sin(0.00215·x). Those are the sequences that produced the published
    All4One numbers, whatever the encoding was meant to be.
    """
    channels = 2 * math.ceil(tokens / 2)
    token = torch.arange(tokens)
    omega = torch.pow(10000.0, -2.0 * (token // 2).float() / channels)  # one frequency per sin/cos pair
    angle = omega[:, None] * torch.arange(dim, dtype=torch.float32)[None, :]
    return torch.where(token[:, None] % 2 == 0, torch.sin(angle), torch.cos(angle))


POSITIONAL_ENCODINGS = {"solo": solo_positions, "textbook": sinusoidal_positions}


def off_diagonal(c: torch.Tensor) -> torch.Tensor:
    """The off-diagonal entries of a square matrix, row by row. A view, not a boolean mask: indexing
    with a mask asks the GPU how many entries it selects, a host sync in every step (gpu_check found it)."""
    n = len(c)
    return c.flatten()[1:].view(n - 1, n + 1)[:, :-1].flatten()


@full_precision
def feature_decorrelation(m1: torch.Tensor, m2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """All4One's feature term over the global batch (momentum projections m without gradient)."""
    m1, m2 = distributed.gather(m1, grad=False), distributed.gather(m2, grad=False)
    z1, z2 = distributed.gather(z1), distributed.gather(z2)
    c_a = F.normalize(m1, dim=0).T @ F.normalize(z2, dim=0)
    c_b = F.normalize(m2, dim=0).T @ F.normalize(z1, dim=0)
    on = ((c_a.diagonal() - 1).pow(2).mean() + (c_b.diagonal() - 1).pow(2).mean()) / 2
    off = (off_diagonal(c_a).pow(2).mean() + off_diagonal(c_b).pow(2).mean()) / 2
    return 10 * (0.5 * on.sqrt() + 0.5 * off.sqrt())


class All4One(nn.Module):
    """NNCLR's projector and predictor, a second predictor, a 3-layer transformer and momentum copies."""

    def __init__(self, backbone: nn.Module, temperature: float = 0.2, temperature_centroid: float = 0.1,
                 proj_hidden_dim: int = 2048, proj_output_dim: int = 256, pred_hidden_dim: int = 4096,
                 queue_size: int = 98304, num_neighbours: int = 5, transformer_layers: int = 3,
                 transformer_heads: int = 8, transformer_dropout: float = 0.1, transformer_lr_scale: float = 0.1,
                 momentum_base: float = 0.99, momentum_final: float = 1.0, momentum_schedule: str = "cosine",
                 weights: tuple[float, float, float] = (0.5, 0.5, 0.5), positional_encoding: str = "solo"):
        super().__init__()
        if positional_encoding not in POSITIONAL_ENCODINGS:
            raise ValueError(f"method.positional_encoding={positional_encoding!r} is not one of "
                             f"{', '.join(POSITIONAL_ENCODINGS)}")
        if num_neighbours < 2:
            raise ValueError(f"method.num_neighbours={num_neighbours} must be >= 2 (the centroid sequence needs one)")
        self.backbone = backbone
        self.temperature, self.temperature_centroid = temperature, temperature_centroid
        self.num_neighbours = num_neighbours
        self.weights = tuple(float(w) for w in weights)  # (centroid, neighbour, feature)
        self.momentum = (momentum_base, momentum_final, momentum_schedule)
        momentum_tau(0.0, *self.momentum)
        d = proj_output_dim
        self.projector = mlp([backbone.feat_dim, proj_hidden_dim, proj_hidden_dim, d], last_bn=True)
        self.predictor = mlp([d, pred_hidden_dim, d])
        self.predictor2 = mlp([d, pred_hidden_dim, d])
        layer = nn.TransformerEncoderLayer(d, transformer_heads, dim_feedforward=2 * d, dropout=transformer_dropout,
                                           batch_first=True)
        self.transformer = nn.TransformerEncoder(layer, transformer_layers, enable_nested_tensor=False)
        for p in self.transformer.parameters():
            p.lr_scale = transformer_lr_scale  # solo-learn trains it at lr 0.1 beside the base lr 1.0
        positions = POSITIONAL_ENCODINGS[positional_encoding](num_neighbours, d)
        self.register_buffer("positions", positions, persistent=False)
        self.momentum_encoder = momentum_copy(nn.Sequential(backbone, self.projector))
        self.queue = Queue(queue_size, d)  # support set of momentum projections of view 1
        keep_queues_out_of_ddp_broadcast(self)

    @staticmethod
    def check_config(cfg) -> list:
        """Config problems found before anything runs (called by harness.jobs.config.validate)."""
        from harness.errors import ConfigError

        value = cfg.method.get("positional_encoding", "solo")
        if value not in POSITIONAL_ENCODINGS:
            return [ConfigError("method.positional_encoding", value, "one of " + ", ".join(POSITIONAL_ENCODINGS))]
        return []

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.projector(self.backbone(x)), dim=1)

    def summarise(self, tokens: torch.Tensor) -> torch.Tensor:
        """The transformer's first output token for a (n, num_neighbours, d) sequence."""
        return self.transformer(tokens + self.positions.to(tokens.dtype))[:, 0]

    def forward(self, views: list[torch.Tensor]) -> LossParts:
        f1, f2 = self.backbone(views[0]), self.backbone(views[1])
        z1, z2 = self.projector(f1).float(), self.projector(f2).float()
        p1, p2 = self.predictor(z1).float(), self.predictor(z2).float()
        q1, q2 = self.predictor2(z1).float(), self.predictor2(z2).float()
        with torch.no_grad():
            m1, m2 = (F.normalize(self.momentum_encoder(v).float(), dim=1) for v in views[:2])
        nn1, nn2 = self.queue.neighbours(m1, self.num_neighbours), self.queue.neighbours(m2, self.num_neighbours)
        neighbour = nnclr_pairs(nn1[:, 0], nn2[:, 0], p1, p2, self.temperature)
        r1, r2 = self.summarise(nn1).float(), self.summarise(nn2).float()
        s1 = self.summarise(torch.cat([q1[:, None], nn1[:, :-1]], dim=1)).float()
        s2 = self.summarise(torch.cat([q2[:, None], nn2[:, :-1]], dim=1)).float()
        centroid = (nn_infonce_pairs(r1, s2, self.temperature_centroid)
                    + nn_infonce_pairs(r2, s1, self.temperature_centroid)) / 2
        feature = feature_decorrelation(m1, m2, z1, z2)
        w_centroid, w_neighbour, w_feature = self.weights
        pair = w_centroid * centroid + w_neighbour * neighbour
        self.queue.stage(m1)
        self.predictions = (p1, p2)  # for synthetic_positive_loss in this step (CLSP)
        logs = {"loss_neighbour": neighbour.mean().detach(), "loss_centroid": centroid.mean().detach(),
                "loss_feature": feature.detach()}
        return LossParts(pair=pair, batch=w_feature * feature, logs=logs, feats=f1.detach())

    def synthetic_positive_loss(self, z_syn: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
        """CLSP ``extra_positive``: synthetic embeddings stand beside the nearest neighbours of the
        neighbour term, weighted like it (methods/clsp/addon.py)."""
        return self.weights[1] * synthetic_positive_pairs(z_syn, selected, *self.predictions, self.temperature)

    def after_step(self, progress: float) -> None:
        update_momentum_encoder(self, progress)
        self.queue.push_staged()
        self.predictions = None
