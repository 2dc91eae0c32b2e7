"""DiT (Peebles & Xie 2023, `models.py`) with cross-attention to text: the denoiser of image and audio diffusion.

    model = DiT(config)                                           # config: a DiffusionConfig
    prediction = model(latents, timesteps, text_emb, text_mask)   # (B, C, H, W) in, (B, C, H, W) out

Latents are cut into patch_height x patch_size patches (a strided conv), each a token of hidden_size plus
the 2D sin-cos position embedding of its grid cell, computed for the actual grid: any H and W divisible by
the patch work, square or not. Each block runs adaLN-Zero-modulated self-attention, cross-attention to the
projected text tokens (padded positions masked out, as in PixArt-alpha) and an adaLN-Zero-modulated MLP.
The conditioning vector c = timestep embedding + a projection of the masked mean of the text tokens drives
every adaLN. The adaLN layers, the cross-attention output projections and the final layer start at zero,
so every block starts as the identity and the untrained model outputs zeros, as in DiT.
Attention runs in torch's scaled_dot_product_attention: on GPUs self-attention always reaches the flash
kernel, cross-attention does when no text in the batch is padded (else the memory-efficient kernel).
"""

import math
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from model.transformer.block import GradientCheckpointing

TIMESTEP_FREQUENCIES = 256  # width of the sinusoidal timestep features, as in DiT


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """timesteps: (B,) float → (B, dim) float32 features [cos(t * f_i), sin(t * f_i)], f_i = max_period^(-i / half)."""
    half = dim // 2
    frequencies = torch.exp(-math.log(max_period) * torch.arange(half, device=timesteps.device) / half)
    angles = timesteps.float()[:, None] * frequencies[None]
    return torch.cat((angles.cos(), angles.sin()), dim=-1)


@lru_cache(maxsize=32)
def sincos_2d(height: int, width: int, dim: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The fixed 2D position embedding of MAE/DiT for a height x width grid: (height * width, dim), row-major.

    The first dim/2 features encode the column, the rest the row, each as [sin(p * w_k), cos(p * w_k)]
    with w_k = 10000^(-k / (dim/4)). Cached per grid, device and dtype (never modify the result).
    """
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, columns = torch.meshgrid(torch.arange(height, dtype=torch.float64),
                                   torch.arange(width, dtype=torch.float64), indexing="ij")

    def encode(positions: torch.Tensor) -> torch.Tensor:
        angles = positions.reshape(-1, 1) * omega[None]
        return torch.cat((angles.sin(), angles.cos()), dim=1)

    return torch.cat((encode(columns), encode(rows)), dim=1).to(device=device, dtype=dtype)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x: (B, N, D); shift, scale: (B, D) → x * (1 + scale) + shift (one fused elementwise op)."""
    return torch.addcmul(shift[:, None], x, 1 + scale[:, None])


class SelfAttention(nn.Module):
    """x: (B, N, D) → (B, N, D), optionally attending only to the tokens token_bias marks."""

    def __init__(self, hidden_size: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor, token_bias: torch.Tensor | None = None) -> torch.Tensor:
        """token_bias: (B, 1, 1, N) bool (True = attend to that token) or None (every token)."""
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=token_bias)
        return self.proj(out.transpose(1, 2).reshape(B, N, D))


class CrossAttention(nn.Module):
    """x: (B, N, D) attends to text: (B, L, D); text_bias: (B, 1, 1, L) bool (True = attend) or None."""

    def __init__(self, hidden_size: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.q = nn.Linear(hidden_size, hidden_size)
        self.kv = nn.Linear(hidden_size, 2 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor, text: torch.Tensor, text_bias: torch.Tensor | None) -> torch.Tensor:
        B, N, D = x.shape
        head = D // self.n_heads
        q = self.q(x).view(B, N, self.n_heads, head).transpose(1, 2)
        k, v = self.kv(text).view(B, text.shape[1], 2, self.n_heads, head).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=text_bias)
        return self.proj(out.transpose(1, 2).reshape(B, N, D))


class DiTBlock(nn.Module):
    """x: (B, N, D), c: (B, D) = SiLU of the conditioning, text: (B, L, D) → (B, N, D); token_bias (B, 1, 1, N)
    bool limits self-attention to the real tokens of variable-length inputs."""

    def __init__(self, hidden_size: int, n_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(hidden_size, n_heads)
        self.norm_cross = nn.LayerNorm(hidden_size, eps=1e-6)
        self.cross_attn = CrossAttention(hidden_size, n_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(hidden_size, mlp_hidden), nn.GELU(approximate="tanh"),
                                 nn.Linear(mlp_hidden, hidden_size))
        self.adaLN_modulation = nn.Linear(hidden_size, 6 * hidden_size)

    def forward(self, x: torch.Tensor, c: torch.Tensor, text: torch.Tensor, text_bias: torch.Tensor | None,
                token_bias: torch.Tensor | None = None) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = torch.addcmul(x, gate_msa[:, None], self.attn(modulate(self.norm1(x), shift_msa, scale_msa), token_bias))
        x = x + self.cross_attn(self.norm_cross(x), text, text_bias)
        return torch.addcmul(x, gate_mlp[:, None], self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)))


class FinalLayer(nn.Module):
    """x: (B, N, D), c: (B, D) → per-patch outputs (B, N, patch_height * patch_size * C)."""

    def __init__(self, hidden_size: int, patch_values: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_values)
        self.adaLN_modulation = nn.Linear(hidden_size, 2 * hidden_size)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(GradientCheckpointing, nn.Module):
    """The denoiser. config: a DiffusionConfig (kept as `.config`). See the module docstring."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        D, C = config.hidden_size, config.latent_channels
        self.patch = (config.patch_height, config.patch_size)
        self.patch_embed = nn.Conv2d(C, D, kernel_size=self.patch, stride=self.patch)
        self.time_embed = nn.Sequential(nn.Linear(TIMESTEP_FREQUENCIES, D), nn.SiLU(), nn.Linear(D, D))
        self.text_proj = nn.Sequential(nn.Linear(config.text_embed_dim, D), nn.GELU(approximate="tanh"),
                                       nn.Linear(D, D))
        self.text_pool_proj = nn.Linear(D, D)
        self.null_text_embedding = nn.Parameter(torch.randn(config.text_embed_dim) / config.text_embed_dim ** 0.5)
        self.blocks = nn.ModuleList(DiTBlock(D, config.n_heads, config.mlp_ratio) for _ in range(config.depth))
        self.final_layer = FinalLayer(D, config.patch_height * config.patch_size * C)
        self._init_weights()

    def _init_weights(self) -> None:
        """DiT's initialize_weights, plus PixArt's zero cross-attention outputs."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.xavier_uniform_(self.patch_embed.weight.view(self.patch_embed.weight.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        for layer in (*self.time_embed[::2], *self.text_proj[::2], self.text_pool_proj):
            nn.init.normal_(layer.weight, std=0.02)
        zeroed = [self.final_layer.adaLN_modulation, self.final_layer.linear]
        for block in self.blocks:
            zeroed += [block.adaLN_modulation, block.cross_attn.proj]
        for layer in zeroed:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, latents: torch.Tensor, timesteps: torch.Tensor, text_emb: torch.Tensor,
                text_mask: torch.Tensor, drop_condition: torch.Tensor | None = None,
                extra_condition: torch.Tensor | None = None, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """latents: (B, C, H, W), or (B, C, T) when patch_height is 1; timesteps: (B,) or scalar, on the
        0..num_train_timesteps scale; text_emb: (B, L, text_embed_dim); text_mask: (B, L) bool, True for
        real tokens, at least one per row; drop_condition: (B,) bool, rows that get the learned null
        condition instead of their text (classifier-free guidance), or None; extra_condition: (B, hidden_size)
        added to the timestep conditioning (e.g. a projected speaker embedding), or None; token_mask: (B, N) bool
        over the patch tokens (row-major grid), True for real ones: self-attention reads only those (at least
        one per row), or None for all.
        Returns the prediction: the latents' shape, in the weights' dtype (or autocast's)."""
        x = self._check_latents(latents)
        B, _, H, W = x.shape
        text_emb, text_mask = self._check_text(text_emb, text_mask, drop_condition, B)
        text_bias = self._text_bias(text_mask)
        dtype = self.patch_embed.weight.dtype
        timesteps = torch.as_tensor(timesteps, device=x.device).float()
        if timesteps.shape not in ((), (B,)):
            raise ValueError(f"timesteps must be (B,) = ({B},) or a scalar, got {tuple(timesteps.shape)}")
        timesteps = timesteps.expand(B)

        grid = (H // self.patch[0], W // self.patch[1])
        # contiguous (B, N, D): elementwise ops keep their first input's layout, so a transposed view here
        # would make every later residual add and linear layer work on (and copy) a strided tensor
        tokens = self.patch_embed(x.to(dtype)).flatten(2).transpose(1, 2).contiguous()
        tokens = tokens + sincos_2d(*grid, self.config.hidden_size, x.device, tokens.dtype)
        text = self.text_proj(text_emb.to(dtype))
        weights = text_mask.to(text.dtype)[..., None]
        pooled = (text * weights).sum(1) / weights.sum(1)
        c = self.time_embed(timestep_embedding(timesteps, TIMESTEP_FREQUENCIES).to(dtype)) + self.text_pool_proj(pooled)
        if extra_condition is not None:
            if extra_condition.shape != (B, self.config.hidden_size):
                raise ValueError(f"extra_condition must be (B, hidden_size) = ({B}, {self.config.hidden_size}), "
                                 f"got {tuple(extra_condition.shape)}")
            c = c + extra_condition.to(c.dtype)
        c = F.silu(c)
        token_bias = self._token_bias(token_mask, B, grid[0] * grid[1])
        for block in self.blocks:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                tokens = checkpoint(block, tokens, c, text, text_bias, token_bias, use_reentrant=False)
            else:
                tokens = block(tokens, c, text, text_bias, token_bias)
        out = self.final_layer(tokens, c)
        out = out.view(B, *grid, *self.patch, -1).permute(0, 5, 1, 3, 2, 4).reshape(B, -1, H, W)
        return out.squeeze(2) if latents.ndim == 3 else out

    def _check_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """latents → (B, C, H, W) after the checks (a 1-D (B, C, T) becomes (B, C, 1, T))."""
        ph, pw = self.patch
        if latents.ndim == 3 and ph == 1:
            latents = latents.unsqueeze(2)
        if latents.ndim != 4:
            one_d = " or (B, C, T)" if ph == 1 else " ((B, C, T) needs patch_height: 1)"
            raise ValueError(f"latents must be (B, C, H, W){one_d}, got shape {tuple(latents.shape)}")
        _, C, H, W = latents.shape
        if C != self.config.latent_channels:
            raise ValueError(f"latents have {C} channels but the model was built for latent_channels="
                             f"{self.config.latent_channels}")
        if H % ph or W % pw:
            raise ValueError(f"latent height {H} and width {W} must be divisible by the patch {ph}x{pw}: "
                             "crop or pad the latents (or the images before encoding)")
        return latents

    def _check_text(self, text_emb: torch.Tensor, text_mask: torch.Tensor, drop_condition: torch.Tensor | None,
                    batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Check shapes, swap in the null condition where drop_condition is set → (text_emb, text_mask bool)."""
        D = self.config.text_embed_dim
        if text_emb.ndim != 3 or text_emb.shape[0] != batch or text_emb.shape[2] != D:
            raise ValueError(f"text_emb must be (B={batch}, L, text_embed_dim={D}), got {tuple(text_emb.shape)}")
        if text_mask.shape != text_emb.shape[:2]:
            raise ValueError(f"text_mask must be (B, L) = {tuple(text_emb.shape[:2])} like text_emb, "
                             f"got {tuple(text_mask.shape)}")
        text_mask = text_mask.bool()
        if drop_condition is not None:
            if drop_condition.shape != (batch,):
                raise ValueError(f"drop_condition must be (B,) = ({batch},) bool, got {tuple(drop_condition.shape)}")
            first = torch.arange(text_emb.shape[1], device=text_emb.device) == 0
            null_text = self.null_text_embedding.to(text_emb.dtype) * first[:, None]
            text_emb = torch.where(drop_condition[:, None, None], null_text, text_emb)
            text_mask = torch.where(drop_condition[:, None], first, text_mask)
        return text_emb, text_mask

    @staticmethod
    def _token_bias(token_mask: torch.Tensor | None, batch: int, tokens: int) -> torch.Tensor | None:
        """SDPA's self-attention mask (B, 1, 1, N) from token_mask (B, N), or None (attend to every token)."""
        if token_mask is None:
            return None
        if token_mask.shape != (batch, tokens):
            raise ValueError(f"token_mask must be (B, N) = ({batch}, {tokens}) over the patch tokens, "
                             f"got {tuple(token_mask.shape)}")
        if not bool(token_mask.any(1).all()):
            raise ValueError("a row of token_mask has no True position: every sample needs at least one real token")
        return token_mask.bool()[:, None, None, :]

    @staticmethod
    def _text_bias(text_mask: torch.Tensor) -> torch.Tensor | None:
        """SDPA's mask (B, 1, 1, L), or None when nothing is padded (so flash attention can run)."""
        every_row_has_text, nothing_padded = torch.stack((text_mask.any(1).all(), text_mask.all())).tolist()
        if not every_row_has_text:
            raise ValueError("a row of text_mask has no True position: every sample needs at least one text token "
                             "(for an empty caption, pass drop_condition=True for that row instead)")
        return None if nothing_padded else text_mask[:, None, None, :]

    def forward_flops(self, height: int, width: int, text_length: int) -> int:
        """Matrix-multiply FLOPs of one forward pass for one latent (C, height, width) and text_length tokens
        (training costs about 3x); for MFU."""
        c = self.config
        D, L, N = c.hidden_size, text_length, (height // c.patch_height) * (width // c.patch_size)
        patch_values = c.patch_height * c.patch_size * c.latent_channels
        mlp = int(D * c.mlp_ratio)
        per_block = (6 * D * D + N * (3 * D * D + D * D + 2 * N * D)  # adaLN, qkv, out proj, scores + values
                     + N * (2 * D * D + 2 * L * D) + L * 2 * D * D     # cross q, out, scores + values; k, v
                     + N * 2 * D * mlp)
        outside = (N * patch_values * D + TIMESTEP_FREQUENCIES * D + D * D + L * (c.text_embed_dim * D + D * D)
                   + D * D + 2 * D * D + N * D * patch_values)
        return 2 * (c.depth * per_block + outside)
