"""An RGB + thermal + text fusion block on embedops' attention modules, trained on a toy
segmentation task, and timed against the same block written in plain PyTorch.

The block (the shape of SHIFNet's fusion, one layer):
  1. `CoAttention(rgb, thermal)`: one shared affinity per head, RGB attends to thermal and thermal
     to RGB (bidirectional exchange, residual);
  2. `CrossAttention(patches, text)`: every patch query reads the text instruction;
  3. `ModalityMixtureAttention(patches, [rgb | thermal])`: one softmax per modality, mixed per patch
     by text-guided weights `softmax_m(gamma * cos(phi_m(x_i), t))` (SHIFNet's SACF): the text says
     which modality to trust.

The task: each scene is a grid of patches holding two objects of C classes; every patch is labelled
with its class (0 = background). By "day" RGB shows the classes clearly and thermal weakly; at
"night" RGB is nearly dark and thermal carries them; in "fog" both are half visible. The text is a
few tokens naming the condition. After training, the learned modality weights should lean to
thermal at night and to RGB by day.

    python examples/cross_modal_fusion.py --quick    # ~30 s on 2 cores
    python examples/cross_modal_fusion.py

Prints the loss, per-condition accuracy and modality weights, then forward and forward+backward
times of the embedops block vs the plain-PyTorch one (the same parameters; outputs and gradients
checked equal first). Exits with status 1 if a check fails.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import embedops
from embedops.nn import CoAttention, CrossAttention, ModalityMixtureAttention

CONDITIONS = {"day": (1.0, 0.1), "night": (0.05, 1.0), "fog": (0.5, 0.5)}  # visibility of (rgb, thermal)
NUM_CLASSES = 5


class FusionBlock(nn.Module):
    """RGB + thermal tokens (B, L, dim) each, text tokens (B, T, dim) -> per-patch features (B, L, dim)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.co = CoAttention(dim, dim, heads)
        self.text_attn = CrossAttention(dim, dim, heads)
        self.mix = ModalityMixtureAttention(dim, dim, heads, num_modalities=2, text_dim=dim)
        self.n1, self.n2, self.n3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, rgb, th, text, plain: bool = False):
        B, L, _ = rgb.shape
        co = plain_co_attention if plain else (lambda m, x, y: m(x, y))
        cross = plain_cross_attention if plain else (lambda m, x, c: m(x, c))
        mix = plain_mixture_attention if plain else (lambda m, x, c, seg, t: m(x, c, seg, text=t))
        d_rgb, d_th = co(self.co, rgb, th)                       # 1. RGB <-> thermal, one shared affinity
        rgb, th = rgb + d_rgb, th + d_th
        x = self.n1(rgb + th)                                    # the patch queries
        x = x + cross(self.text_attn, x, text)                   # 2. read the instruction
        t = text.mean(1)                                         # the text embedding for SACF
        seg = torch.tensor([[L, L]], device=rgb.device).expand(B, 2)
        x = x + mix(self.mix, self.n2(x), torch.cat([rgb, th], 1), seg, t)  # 3. text-guided modality mix
        return x + self.ff(self.n3(x))


# ---- the same three modules in plain PyTorch (SDPA / einsum), on the modules' own parameters -----------


def _heads(t, H):
    B, L, _ = t.shape
    return t.view(B, L, H, -1).transpose(1, 2)  # (B, H, L, D)


def _merge(t):
    B, H, L, D = t.shape
    return t.transpose(1, 2).reshape(B, L, H * D)


def plain_co_attention(m: CoAttention, x, y):
    H = m.num_heads
    qx, ky, vx, vy = _heads(m.qx_proj(x), H), _heads(m.ky_proj(y), H), _heads(m.vx_proj(x), H), _heads(m.vy_proj(y), H)
    s = qx @ ky.transpose(-1, -2) * (m.scale or m.head_dim ** -0.5)  # (B, H, Lx, Ly), materialised
    ox = torch.softmax(s, -1) @ vy
    oy = torch.softmax(s, -2).transpose(-1, -2) @ vx
    return m.out_x(_merge(ox)), m.out_y(_merge(oy))


def plain_cross_attention(m: CrossAttention, x, c):
    H = m.num_heads
    o = F.scaled_dot_product_attention(_heads(m.q_proj(x), H), _heads(m.k_proj(c), H), _heads(m.v_proj(c), H),
                                       scale=m.scale)
    return m.out_proj(_merge(o))


def plain_mixture_attention(m: ModalityMixtureAttention, x, c, seg, t):
    H = m.num_heads
    w = m.modality_weights(x, t)  # (B, Lq, M)
    q, k, v = _heads(m.q_proj(x), H), _heads(m.k_proj(c), H), _heads(m.v_proj(c), H)
    L = c.shape[1] // m.num_modalities  # equal segments here
    o = sum(w[:, None, :, i, None] * F.scaled_dot_product_attention(q, k[:, :, i * L:(i + 1) * L],
                                                                    v[:, :, i * L:(i + 1) * L], scale=m.scale)
            for i in range(m.num_modalities))
    return m.out_proj(_merge(o))


# ---- the toy task ------------------------------------------------------------------------------------


class Scenes:
    """Patch grids with two rectangles of random classes; tokens = visibility * class pattern + noise."""

    def __init__(self, side: int, dim: int, seed: int):
        self.g = torch.Generator().manual_seed(seed)
        self.side, self.dim = side, dim
        self.rgb_pat = torch.randn(NUM_CLASSES + 1, dim, generator=self.g)
        self.th_pat = torch.randn(NUM_CLASSES + 1, dim, generator=self.g)
        self.words = torch.randn(len(CONDITIONS) + 8, dim, generator=self.g) * 0.5  # conditions + filler words
        self.pos = torch.randn(side * side, dim, generator=self.g) * 0.1

    def batch(self, B: int):
        g, S = self.g, self.side
        labels = torch.zeros(B, S, S, dtype=torch.long)
        for obj in range(2):
            cls = torch.randint(1, NUM_CLASSES + 1, (B,), generator=g)
            y0, x0 = torch.randint(0, S - 2, (2, B), generator=g)
            h, w = torch.randint(2, S // 2 + 1, (2, B), generator=g)
            ys, xs = torch.arange(S)[None, :, None], torch.arange(S)[None, None, :]
            inside = (ys >= y0[:, None, None]) & (ys < (y0 + h)[:, None, None]) & \
                     (xs >= x0[:, None, None]) & (xs < (x0 + w)[:, None, None])
            labels = torch.where(inside, cls[:, None, None], labels)
        labels = labels.view(B, S * S)
        cond = torch.randint(0, len(CONDITIONS), (B,), generator=g)
        vis = torch.tensor(list(CONDITIONS.values()))[cond]  # (B, 2)
        noise = lambda: 3.0 * torch.randn(B, S * S, self.dim, generator=g)
        rgb = vis[:, 0, None, None] * self.rgb_pat[labels] * 1.5 + noise() + self.pos
        th = vis[:, 1, None, None] * self.th_pat[labels] * 1.5 + noise() + self.pos
        filler = torch.randint(len(CONDITIONS), len(self.words), (B, 5), generator=g)
        text = self.words[torch.cat([cond[:, None], filler], 1)]  # (B, 6, dim): condition word + filler
        return rgb, th, text, labels, cond


class Segmenter(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.inp_rgb, self.inp_th, self.inp_txt = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.block = FusionBlock(dim, heads)
        self.head = nn.Linear(dim, NUM_CLASSES + 1)

    def forward(self, rgb, th, text, plain=False):
        return self.head(self.block(self.inp_rgb(rgb), self.inp_th(th), self.inp_txt(text), plain))


def timed(fn, reps: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="150 training steps, a smaller timing case (CI)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    dim, heads, side = 64, 4, 8
    steps, B = (150, 32) if args.quick else (800, 64)
    failures = []
    print(f"embedops {embedops.__version__}: RGB + thermal {side}x{side} patches, dim {dim}, {heads} heads, "
          f"{steps} steps of batch {B}")

    # 1. the two implementations agree (outputs and gradients), in float64 -------------------------------------
    model = Segmenter(dim, heads).double()
    data = Scenes(side, dim, args.seed)
    rgb, th, text, labels, _ = (t.double() if t.is_floating_point() else t for t in data.batch(4))
    outs, grads = [], []
    for plain in (False, True):
        model.zero_grad()
        out = model(rgb, th, text, plain=plain)
        out.square().sum().backward()
        outs.append(out.detach())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    err_out = (outs[0] - outs[1]).abs().max().item()
    err_grad = ((grads[0] - grads[1]).abs().max() / grads[1].abs().max()).item()
    ok = err_out < 1e-10 and err_grad < 1e-10
    print(f"  [{'ok' if ok else 'FAIL'}] embedops block == plain PyTorch block (float64): max |out diff| "
          f"{err_out:.1e}, max relative grad diff {err_grad:.1e}")
    if not ok:
        failures.append("embedops and plain-PyTorch blocks differ")

    # 2. train (float32, embedops modules) ---------------------------------------------------------------
    torch.manual_seed(args.seed)
    model = Segmenter(dim, heads)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    every = max(steps // 6, 1)
    losses = []
    print(f"\n{'step':>6}{'loss':>9}   (mean over the last {every} steps)")
    for step in range(1, steps + 1):
        rgb, th, text, labels, _ = data.batch(B)
        loss = F.cross_entropy(model(rgb, th, text).flatten(0, 1), labels.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % every == 0:
            print(f"{step:>6}{sum(losses[-every:]) / every:>9.4f}")
    n = max(steps // 10, 1)
    first, last = sum(losses[:n]) / n, sum(losses[-n:]) / n
    if not last < 0.8 * first:
        failures.append(f"training loss did not decrease enough ({first:.3f} -> {last:.3f})")

    # 3. per-condition accuracy and the text-guided modality weights ---------------------------------------------
    with torch.no_grad():
        rgb, th, text, labels, cond = data.batch(1024)
        pred = model(rgb, th, text).argmax(-1)
        blk = model.block
        # recompute the mixture's query input to read its weights (the same path as forward)
        r, t_, tx = model.inp_rgb(rgb), model.inp_th(th), model.inp_txt(text)
        d_r, d_t = blk.co(r, t_)
        r, t_ = r + d_r, t_ + d_t
        x = blk.n1(r + t_)
        x = x + blk.text_attn(x, tx)
        w = blk.mix.modality_weights(blk.n2(x), tx.mean(1))  # (B, L, 2)
    print(f"\n{'condition':<10}{'patch acc':>10}{'object acc':>11}{'w_rgb':>8}{'w_thermal':>10}")
    for c, name in enumerate(CONDITIONS):
        sel = cond == c
        obj = labels[sel] > 0
        acc = (pred[sel] == labels[sel]).float().mean().item()
        oacc = (pred[sel][obj] == labels[sel][obj]).float().mean().item()
        wr, wt = w[sel].mean((0, 1)).tolist()
        print(f"{name:<10}{acc:>10.3f}{oacc:>11.3f}{wr:>8.3f}{wt:>10.3f}")
    print(f"(chance: {(labels == 0).float().mean().item():.3f} patch accuracy by always predicting background)")

    # 4. timing: forward and forward+backward of the block, embedops vs plain PyTorch ------------------------------
    tside, tB = (16, 8) if args.quick else (32, 8)
    block = FusionBlock(dim, heads)
    L = tside * tside
    rgb, th, text = torch.randn(tB, L, dim), torch.randn(tB, L, dim), torch.randn(tB, 6, dim)
    reps = 3 if args.quick else 10
    print(f"\ntiming the fusion block: batch {tB}, {L} RGB + {L} thermal tokens, 6 text tokens, dim {dim}, "
          f"{heads} heads ({torch.get_num_threads()} threads)")
    print(f"{'':<16}{'forward ms':>12}{'fwd+bwd ms':>12}")
    res = {}
    for plain in (False, True):
        def fwd():
            with torch.no_grad():
                block(rgb, th, text, plain=plain)

        def fwd_bwd():
            block.zero_grad(set_to_none=True)
            block(rgb, th, text, plain=plain).sum().backward()

        res[plain] = (timed(fwd, reps), timed(fwd_bwd, reps))
        print(f"{'plain PyTorch' if plain else 'embedops':<16}{res[plain][0]:>12.2f}{res[plain][1]:>12.2f}")
    print(f"{'speedup':<16}{res[True][0] / res[False][0]:>11.2f}x{res[True][1] / res[False][1]:>11.2f}x")

    for f in failures:
        print(f"FAIL: {f}")
    print("all checks passed" if not failures else "")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
