"""Independent, deliberately naive oracle for fastmim's tests.

Every function and module here is a literal transcription of docs/method.md (section numbers are cited in
the comments) so that a reviewer can check it line by line against that text. Nothing is optimised and nothing
is shared with the fastmim package: only torch, torch.nn.functional and math are imported.

Module names follow the released checkpoints (method 9), so ``state_dict()`` keys are exactly the released
ones and a released state dict (its "model" entry) loads with ``load_state_dict(..., strict=True)``.

dtype: everything follows the dtype of the inputs / parameters; fp64 works. The fixed constants (sin-cos position
embeddings, Sobel kernels) are created in float64 and cast to ``torch.get_default_dtype()``; construct under
``torch.set_default_dtype(torch.float64)`` (or load a state dict after ``.double()``) for exact fp64 constants.

Public names:
    sobel_weight(dtype=None) -> Tensor [2, 1, 3, 3]
    literal_hog(img, cell_size, nbins, bias=None, weight=None) -> Tensor [B, N, 3 * nbins]
    literal_pixel_target(img, cell_size, norm_pix=True) -> Tensor [B, N, p * p * 3]
    literal_random_masking(noise, mask_ratio) -> (ids_keep, ids_restore, mask)
    literal_mask_weights(mask, grid_size, scale) -> Tensor [B, N_k]
    literal_masked_mse(pred, target, weight) -> scalar Tensor
    sincos_pos_embed_2d(dim, grid_size) -> Tensor [1 + grid_size**2, dim]  (cls row zero)
    ReleasedLocalMIMViT(...)  forward(imgs, noise=None) -> (loss, [L_0, L_1, L_2, L_3])
    ReleasedMAEViT(...)       forward(imgs, noise=None) -> loss

The LocalMIM-Swin oracle (the released pre-training computation, both token-coordinate rules) is tests/oracles_swin.py.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

# method 2.2: scale s (cells per patch side) of the four taps, in tap order.
LOCALMIM_SCALES = (4, 2, 1, 0.5)


# ----------------------------------------------------------------------------------------------------------------
# Targets (method 3)
# ----------------------------------------------------------------------------------------------------------------


def sobel_weight(dtype=None):
    """method 3.1 step 1: the two 3x3 kernels as a conv2d weight [2, 1, 3, 3] (out 0 = G0, out 1 = G1)."""
    if dtype is None:
        dtype = torch.get_default_dtype()
    k0 = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]], dtype=torch.float64)
    k1 = k0.t()  # its transpose: [[1, 2, 1], [0, 0, 0], [-1, -2, -1]]
    return torch.stack([k0, k1], dim=0).unsqueeze(1).to(dtype)


@torch.no_grad()
def literal_hog(img, cell_size, nbins, bias=None, weight=None):
    """method 3.1 for one scale. img: [B, 3, H, W] (the normalised image). Returns [B, N, 3 * nbins].

    bias: optional [2] conv bias (method 3.3). weight: optional [2, 1, 3, 3] conv weight (default: the Sobel kernels).
    """
    # "in fp32 even under autocast": never compute below fp32; fp64 inputs stay fp64.
    dtype = torch.float64 if img.dtype == torch.float64 else torch.float32
    with torch.autocast(device_type=img.device.type, enabled=False):
        img = img.to(dtype)
        if weight is None:
            weight = sobel_weight(dtype)
        weight = weight.to(device=img.device, dtype=dtype)
        if bias is not None:
            bias = bias.to(device=img.device, dtype=dtype)
        B, C, H, W = img.shape
        per_channel = []
        for c in range(C):  # separately for each colour channel (R, G, B)
            channel = img[:, c : c + 1, :, :]  # B x 1 x H x W
            # step 1: 3x3 cross-correlation, stride 1, padding 1 in reflect mode, 2 output maps
            padded = F.pad(channel, (1, 1, 1, 1), mode="reflect")
            grads = F.conv2d(padded, weight, bias, stride=1)  # B x 2 x H x W
            g0 = grads[:, 0, :, :]
            g1 = grads[:, 1, :, :]
            # step 2: magnitude
            magnitude = torch.sqrt(g0 * g0 + g1 * g1)  # B x H x W
            # step 3: angle, first argument G0
            phi = torch.atan2(g0, g1)
            # step 4: hard bin, non-negative modulo
            bins = torch.remainder(torch.floor(phi / math.pi * nbins), nbins).long()  # B x H x W
            # one-hot-times-magnitude map B x nbins x H x W
            onehot = torch.zeros(B, nbins, H, W, dtype=dtype, device=img.device)
            onehot.scatter_(1, bins.unsqueeze(1), magnitude.unsqueeze(1))
            # step 5: average over each cell (kernel = stride = cell size)
            hist = F.avg_pool2d(onehot, kernel_size=cell_size, stride=cell_size)  # B x nbins x h x w
            # step 6: L2-normalise over the bins axis: x / max(||x||, 1e-12)
            norm = torch.sqrt((hist * hist).sum(dim=1, keepdim=True))
            hist = hist / torch.clamp(norm, min=1e-12)
            per_channel.append(hist)
        # step 7: all R bins, then G, then B; flatten cells row-major
        feats = torch.cat(per_channel, dim=1)  # B x (3 * nbins) x h x w
        return feats.flatten(2).transpose(1, 2)  # B x (h * w) x (3 * nbins)


@torch.no_grad()
def literal_pixel_target(img, cell_size, norm_pix=True):
    """method 3.2. img: [B, 3, H, W]. Returns [B, N, p * p * 3], features ordered (row in cell, column in cell,
    channel), cells flattened row-major."""
    B, C, H, W = img.shape
    p = cell_size
    h = H // p
    w = W // p
    x = img.reshape(B, C, h, p, w, p)  # b, c, cell row, row in cell, cell col, col in cell
    x = x.permute(0, 2, 4, 3, 5, 1)  # b, cell row, cell col, row in cell, col in cell, channel
    x = x.reshape(B, h * w, p * p * C)
    if norm_pix:
        mean = x.mean(dim=-1, keepdim=True)
        var = x.var(dim=-1, unbiased=True, keepdim=True)
        x = (x - mean) / torch.sqrt(var + 1e-6)
    return x


# ----------------------------------------------------------------------------------------------------------------
# Masking and loss (method 2.1, 2.4)
# ----------------------------------------------------------------------------------------------------------------


def literal_random_masking(noise, mask_ratio):
    """method 2.1. noise: [B, L]. Returns ids_keep [B, len_keep], ids_restore [B, L], mask [B, L] (1 = removed)."""
    B, L = noise.shape
    len_keep = int(L * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)  # ascending
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    mask = torch.ones(B, L, dtype=noise.dtype, device=noise.device)
    mask[:, :len_keep] = 0  # in shuffled order: the first len_keep are kept
    mask = torch.gather(mask, dim=1, index=ids_restore)  # back to original patch order
    return ids_keep, ids_restore, mask


def literal_mask_weights(mask, grid_size, scale):
    """method 2.4 per-scale weight M_k. mask: [B, L] with L = grid_size**2 (1 = masked). Returns [B, N_k]."""
    B = mask.shape[0]
    m = mask.reshape(B, grid_size, grid_size)  # token t -> row t // g, column t % g
    if scale >= 1:
        s = int(scale)
        # nearest upsampling: each patch's value copied to its s x s cells
        m = m.repeat_interleave(s, dim=1).repeat_interleave(s, dim=2)
    else:
        # s = 1/2: 2 x 2 average (fraction of masked patches in the group)
        m = F.avg_pool2d(m.unsqueeze(1), kernel_size=2, stride=2).squeeze(1)
    return m.reshape(B, -1)


def literal_masked_mse(pred, target, weight):
    """method 2.4: sum_{b,j} M[b,j] * mean_c (P - T)^2 [b,j,c] / sum_{b,j} M[b,j]."""
    per_cell = ((pred - target) ** 2).mean(dim=-1)  # B x N
    return (per_cell * weight).sum() / weight.sum()


# ----------------------------------------------------------------------------------------------------------------
# Position embedding (method 2.1)
# ----------------------------------------------------------------------------------------------------------------


def literal_targets(imgs, target, cell_sizes, nbins, hog_enc):
    """The four scales' targets (method 3, without gradient): HOG through each scale's own frozen Sobel layer
    ``hog_enc[k].conv`` (its bias, method 3.3), or normalised pixels."""
    targets = []
    with torch.no_grad():
        for k, cell in enumerate(cell_sizes):
            if target == "hog":
                conv = hog_enc[k].conv
                t = literal_hog(imgs, cell, nbins, bias=conv.bias, weight=conv.weight)
            else:
                t = literal_pixel_target(imgs, cell, norm_pix=True)
            targets.append(t.to(imgs.dtype))
    return targets


def _sincos_1d(dim, positions):
    """[sin | cos] of positions * omega_i, omega_i = 1 / 10000^(2i / dim), i = 0 .. dim/2 - 1. Returns [P, dim]."""
    assert dim % 2 == 0
    i = torch.arange(dim // 2, dtype=torch.float64)
    omega = 1.0 / 10000.0 ** (2.0 * i / dim)
    out = positions.to(torch.float64).reshape(-1, 1) * omega.reshape(1, -1)  # P x dim/2
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_pos_embed_2d(dim, grid_size):
    """method 2.1: fixed 2-D sin-cos embedding [1 + g*g, dim]; row 0 (cls) is zero.

    Token t (row t // g, column t % g). The first dim/2 channels encode the column index and the last dim/2 the
    row index (the MAE construction; the method only says "half the row, half the column"), each half as [sin | cos]
    with frequencies 1/10000^(2i/(dim/2)). Computed in float64, returned in the default dtype.
    """
    assert dim % 4 == 0
    rows = []
    for t in range(grid_size * grid_size):
        r = t // grid_size
        c = t % grid_size
        col_half = _sincos_1d(dim // 2, torch.tensor([float(c)]))[0]
        row_half = _sincos_1d(dim // 2, torch.tensor([float(r)]))[0]
        rows.append(torch.cat([col_half, row_half]))
    emb = torch.stack(rows, dim=0)
    emb = torch.cat([torch.zeros(1, dim, dtype=torch.float64), emb], dim=0)
    return emb.to(torch.get_default_dtype())


# ----------------------------------------------------------------------------------------------------------------
# Transformer block (method 2.1): pre-norm, qkv bias, explicit softmax attention, exact GELU, LayerNorm eps 1e-6
# ----------------------------------------------------------------------------------------------------------------


class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        assert dim % num_heads == 0
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x):
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # each B x heads x N x head_dim
        attn = (q @ k.transpose(-2, -1)) * self.head_dim**-0.5
        attn = torch.softmax(attn, dim=-1)
        out = attn @ v  # B x heads x N x head_dim
        out = out.transpose(1, 2).reshape(B, N, D)
        return self.proj(out)


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="none"))


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return x


class PatchEmbed(nn.Module):
    def __init__(self, patch_size, embed_dim):
        super().__init__()
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, imgs):
        x = self.proj(imgs)  # B x D x g x g
        return x.flatten(2).transpose(1, 2)  # B x L x D, token t = row t // g, column t % g


def _init_linear_and_layernorm(module):
    """method 2.1: every Linear xavier-uniform with zero bias; every LayerNorm weight 1, bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _frozen(tensor):
    return nn.Parameter(tensor, requires_grad=False)


# ----------------------------------------------------------------------------------------------------------------
# LocalMIM ViT (method 2, module names of method 9)
# ----------------------------------------------------------------------------------------------------------------


class LN2d(nn.Module):
    """LayerNorm over channels at each position of a B x C x H x W map, eps 1e-6 (method 2.3 step 6)."""

    def __init__(self, channels, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x):
        mean = x.mean(dim=1, keepdim=True)
        var = ((x - mean) ** 2).mean(dim=1, keepdim=True)  # biased, as LayerNorm
        x = (x - mean) / torch.sqrt(var + self.eps)
        return x * self.weight.reshape(1, -1, 1, 1) + self.bias.reshape(1, -1, 1, 1)


def _make_pred_head(scale, C, out):
    """method 2.3 step 6, indexed as method 9."""
    if scale == 4:
        return nn.Sequential(
            nn.ConvTranspose2d(C, C // 2, kernel_size=2, stride=2),  # 0
            LN2d(C // 2),  # 1
            nn.GELU(approximate="none"),  # 2
            nn.ConvTranspose2d(C // 2, C // 4, kernel_size=2, stride=2),  # 3
            nn.Conv2d(C // 4, out, kernel_size=1),  # 4
        )
    if scale == 2:
        return nn.Sequential(
            nn.ConvTranspose2d(C, C // 2, kernel_size=2, stride=2),  # 0
            nn.Conv2d(C // 2, out, kernel_size=1),  # 1
        )
    if scale == 1:
        return nn.Sequential(nn.Conv2d(C, out, kernel_size=1))  # 0
    if scale == 0.5:
        return nn.Sequential(
            nn.AvgPool2d(kernel_size=2, stride=2),  # 0
            nn.Conv2d(C, out, kernel_size=1),  # 1
        )
    raise ValueError(f"unknown scale {scale}")


class LocalMIMDecoder(nn.Module):
    """One decoder (method 2.3): names embed, mask_token, pos_embed, blocks.0, norm, pred."""

    def __init__(self, embed_dim, decoder_dim, decoder_heads, mlp_ratio, grid_size, scale, out):
        super().__init__()
        self.grid_size = grid_size
        self.embed = nn.Linear(embed_dim, decoder_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.pos_embed = _frozen(sincos_pos_embed_2d(decoder_dim, grid_size).unsqueeze(0))
        self.blocks = nn.ModuleList([Block(decoder_dim, decoder_heads, mlp_ratio)])
        self.norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.pred = _make_pred_head(scale, decoder_dim, out)

    def forward(self, latent, ids_restore):
        B = latent.shape[0]
        L = ids_restore.shape[1]
        # step 1: Linear on all tokens, cls included
        x = self.embed(latent)  # B x (1 + kept) x C
        C = x.shape[-1]
        # step 2: append mask tokens after the patch tokens (cls excluded), un-shuffle, prepend cls again
        kept = x.shape[1] - 1
        mask_tokens = self.mask_token.expand(B, L - kept, C)
        patches = torch.cat([x[:, 1:, :], mask_tokens], dim=1)  # B x L x C, shuffled order
        index = ids_restore.unsqueeze(-1).expand(B, L, C)
        patches = torch.gather(patches, dim=1, index=index)  # original order
        x = torch.cat([x[:, :1, :], patches], dim=1)  # B x (1 + L) x C
        # step 3: own fixed position embedding
        x = x + self.pos_embed
        # step 4: one block, then LayerNorm
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        # step 5: drop cls, view as C x g x g map (token t -> row t // g, column t % g)
        x = x[:, 1:, :]
        g = self.grid_size
        fmap = x.transpose(1, 2).reshape(B, C, g, g)
        # step 6: head
        y = self.pred(fmap)  # B x out x h x w
        # step 7: flatten row-major
        return y.flatten(2).transpose(1, 2)  # B x (h * w) x out


class HOGLayer(nn.Module):
    """hog_enc.{k}: frozen Sobel conv, optional frozen bias U(-1/3, 1/3) (method 3.1 step 1, 3.3)."""

    def __init__(self, hog_bias):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, kernel_size=3, stride=1, padding=0, bias=hog_bias)
        with torch.no_grad():
            self.conv.weight.copy_(sobel_weight(self.conv.weight.dtype))
            if hog_bias:
                self.conv.bias.uniform_(-1.0 / 3.0, 1.0 / 3.0)  # PyTorch default conv-bias init, fan-in 9
        for p in self.conv.parameters():
            p.requires_grad_(False)


class ReleasedLocalMIMViT(nn.Module):
    """The LocalMIM ViT of method 2 with the released checkpoint's module names (method 9).

    forward(imgs, noise=None) -> (loss, [L_0, L_1, L_2, L_3]); also stores self.last_mask [B, L],
    self.last_preds / self.last_targets / self.last_weights (lists over k of [B, N_k, F] / [B, N_k]).
    target: "hog" (default, method 3.1) or "pixel" (method 3.2 with norm_pix; head out = cell^2 * 3; no hog_enc).
    """

    def __init__(
        self,
        img_size=224,
        patch_size=16,
        embed_dim=768,
        depth=12,
        num_heads=12,
        decoder_dim=256,
        decoder_heads=8,
        mlp_ratio=4.0,
        nbins=9,
        hog_bias=False,
        mask_ratio=0.75,
        target="hog",
    ):
        super().__init__()
        assert img_size % patch_size == 0
        self.img_size = img_size
        self.patch_size = patch_size
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size**2
        self.nbins = nbins
        self.mask_ratio = mask_ratio
        self.target = target
        self.taps = [1, 3, depth - 3, depth - 1]  # method 2.1, 0-based
        self.scales = list(LOCALMIM_SCALES)
        self.cell_sizes = []
        for s in self.scales:
            cell = patch_size / s
            assert cell == int(cell) and img_size % int(cell) == 0, (patch_size, s, img_size)
            self.cell_sizes.append(int(cell))

        # encoder
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = _frozen(sincos_pos_embed_2d(embed_dim, self.grid_size).unsqueeze(0))
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.ModuleList([nn.LayerNorm(embed_dim, eps=1e-6) for _ in range(4)])

        # decoders
        decoders = []
        for k in range(4):
            if target == "hog":
                out = 3 * nbins
            elif target == "pixel":
                out = self.cell_sizes[k] ** 2 * 3
            else:
                raise ValueError(target)
            decoders.append(
                LocalMIMDecoder(embed_dim, decoder_dim, decoder_heads, mlp_ratio, self.grid_size, self.scales[k], out)
            )
        self.decoder = nn.ModuleList(decoders)

        # HOG layers, one per scale, each with its own (optional) bias draw
        if target == "hog":
            self.hog_enc = nn.ModuleList([HOGLayer(hog_bias) for _ in range(4)])

        self._init_weights()

    def _init_weights(self):
        # method 2.1 / 2.3. Conv / ConvTranspose in heads keep PyTorch's default init; patch-embed bias too.
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        for dec in self.decoder:
            nn.init.normal_(dec.mask_token, std=0.02)
        _init_linear_and_layernorm(self)

    def encode(self, imgs, noise):
        """method 2.1 order. Returns ([latent_k for k in 0..3], mask, ids_restore)."""
        x = self.patch_embed(imgs)  # B x L x D
        x = x + self.pos_embed[:, 1:, :]
        ids_keep, ids_restore, mask = literal_random_masking(noise, self.mask_ratio)
        D = x.shape[-1]
        x = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).expand(-1, -1, D))
        cls = self.cls_token + self.pos_embed[:, :1, :]
        x = torch.cat([cls.expand(x.shape[0], -1, -1), x], dim=1)
        block_outputs = {}
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            block_outputs[i] = x  # residual stream continues un-normed
        latents = [self.norm[k](block_outputs[self.taps[k]]) for k in range(4)]
        return latents, mask, ids_restore

    def compute_targets(self, imgs):
        return literal_targets(imgs, self.target, self.cell_sizes, self.nbins, getattr(self, "hog_enc", None))

    def forward(self, imgs, noise=None):
        B = imgs.shape[0]
        if noise is None:
            noise = torch.rand(B, self.num_patches, device=imgs.device)
        latents, mask, ids_restore = self.encode(imgs, noise)
        targets = self.compute_targets(imgs)
        preds = []
        weights = []
        losses = []
        for k in range(4):
            pred = self.decoder[k](latents[k], ids_restore)
            weight = literal_mask_weights(mask, self.grid_size, self.scales[k]).to(pred.dtype)
            losses.append(literal_masked_mse(pred, targets[k], weight))
            preds.append(pred)
            weights.append(weight)
        loss = losses[0] + losses[1] + losses[2] + losses[3]
        self.last_mask = mask
        self.last_preds = preds
        self.last_targets = targets
        self.last_weights = weights
        return loss, losses


# ----------------------------------------------------------------------------------------------------------------
# MAE ViT (released MAE names, method 9)
# ----------------------------------------------------------------------------------------------------------------


class ReleasedMAEViT(nn.Module):
    """MAE with normalised-pixel target (method 3.2, cell = patch). forward(imgs, noise=None) -> loss.

    Also stores self.last_mask [B, L], self.last_pred [B, L, p*p*3], self.last_target.
    """

    def __init__(
        self,
        img_size=224,
        patch_size=16,
        embed_dim=768,
        depth=12,
        num_heads=12,
        decoder_dim=512,
        decoder_depth=8,
        decoder_heads=16,
        mlp_ratio=4.0,
        mask_ratio=0.75,
    ):
        super().__init__()
        assert img_size % patch_size == 0
        self.patch_size = patch_size
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size**2
        self.mask_ratio = mask_ratio

        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = _frozen(sincos_pos_embed_2d(embed_dim, self.grid_size).unsqueeze(0))
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)

        self.decoder_embed = nn.Linear(embed_dim, decoder_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_pos_embed = _frozen(sincos_pos_embed_2d(decoder_dim, self.grid_size).unsqueeze(0))
        self.decoder_blocks = nn.ModuleList(
            [Block(decoder_dim, decoder_heads, mlp_ratio) for _ in range(decoder_depth)]
        )
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_dim, patch_size * patch_size * 3, bias=True)

        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        _init_linear_and_layernorm(self)

    def forward(self, imgs, noise=None):
        B = imgs.shape[0]
        L = self.num_patches
        if noise is None:
            noise = torch.rand(B, L, device=imgs.device)
        # encoder
        x = self.patch_embed(imgs)
        x = x + self.pos_embed[:, 1:, :]
        ids_keep, ids_restore, mask = literal_random_masking(noise, self.mask_ratio)
        D = x.shape[-1]
        x = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).expand(-1, -1, D))
        cls = self.cls_token + self.pos_embed[:, :1, :]
        x = torch.cat([cls.expand(B, -1, -1), x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        # decoder
        x = self.decoder_embed(x)
        C = x.shape[-1]
        kept = x.shape[1] - 1
        mask_tokens = self.mask_token.expand(B, L - kept, C)
        patches = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
        patches = torch.gather(patches, dim=1, index=ids_restore.unsqueeze(-1).expand(B, L, C))
        x = torch.cat([x[:, :1, :], patches], dim=1)
        x = x + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_norm(x)
        pred = self.decoder_pred(x)[:, 1:, :]  # B x L x p*p*3
        # loss
        target = literal_pixel_target(imgs, self.patch_size, norm_pix=True).to(pred.dtype)
        loss = literal_masked_mse(pred, target, mask.to(pred.dtype))
        self.last_mask = mask
        self.last_pred = pred
        self.last_target = target
        return loss
