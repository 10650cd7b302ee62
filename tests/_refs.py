"""Brute-force references for the core-math tests, written differently from ``nemo_occ.core``.

Everything here loops over sequences, tokens and documents in Python (0-d tensors where autograd
must flow through, plain floats otherwise), states the clipped surrogate as an objective to
*maximise* with ``min`` (the code minimises ``max`` of negatives), and computes log-probs of a tiny
model with ``F.log_softmax`` + ``gather``. It imports nothing from ``nemo_occ``.

Letters: B sequences, S token positions, V vocabulary, H hidden size, K MTP depths.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------
# data


def rand_batch(seed: int, B: int = 8, S: int = 7, spread: float = 0.5, dtype=torch.float64):
    """Log-probs around -1 whose ratios reach well beyond usual clip bounds, MTP log-probs whose
    change is positively correlated with the main head's, mixed-sign advantages, and a ragged mask (every row keeps at least one valid token, row lengths differ)."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, S, generator=g, dtype=dtype) * 2 - 0.1  # [B, S]
    new = old + torch.randn(B, S, generator=g, dtype=dtype) * spread  # [B, S]
    # MTP change correlated with the main head's (ĉ > 0) but not proportional to it
    mtp = old + 0.5 * (new - old) + torch.randn(B, S, generator=g, dtype=dtype) * spread * 0.7  # [B, S]
    adv = torch.randn(B, generator=g, dtype=dtype)  # [B]
    lengths = torch.randint(1, S + 1, (B,), generator=g)
    mask = torch.zeros(B, S, dtype=torch.bool)
    for i in range(B):
        mask[i, : int(lengths[i])] = True
    return new, old, mtp, adv, mask


# ----------------------------------------------------------------------------------------------
# clipped policy loss


def _clip(x, lo, hi):
    if x < lo:
        return x * 0 + lo
    if x > hi:
        return x * 0 + hi
    return x


def _surrogate(ratio, a, clip_low, clip_high, clip_c):
    """PPO objective of one token (to maximise): min(r·A, clip(r)·A), dual-clipped to >= c·A for A < 0."""
    obj = min(ratio * a, _clip(ratio, 1 - clip_low, 1 + clip_high) * a)
    if clip_c is not None and a < 0:
        obj = max(obj, clip_c * a)
    return obj


def loop_policy_loss(
    logprobs,
    old,
    adv,
    mask,
    *,
    clip_low,
    clip_high,
    clip_c=None,
    aggregation="token_mean",
    importance_ratio="token",
    n_tokens=None,
    n_seqs=None,
):
    """Loss to minimise, one token / one sequence at a time. ``adv`` is [B] or [B, S]."""
    B, S = mask.shape
    total = logprobs.new_zeros(())
    for i in range(B):
        idx = [t for t in range(S) if bool(mask[i, t])]
        if not idx:
            continue
        a_of = (lambda t, i=i: adv[i, t]) if adv.dim() == 2 else (lambda t, i=i: adv[i])
        if importance_ratio == "sequence":
            log_s = sum(logprobs[i, t] - old[i, t] for t in idx) / len(idx)
            s = torch.exp(log_s)
            per_tok = [-_surrogate(s, a_of(t), clip_low, clip_high, clip_c) for t in idx]
        else:
            per_tok = [
                -_surrogate(torch.exp(logprobs[i, t] - old[i, t]), a_of(t), clip_low, clip_high, clip_c)
                for t in idx
            ]
        if aggregation == "token_mean":
            for x in per_tok:
                total = total + x / n_tokens
        else:
            total = total + (sum(per_tok) / len(idx)) / n_seqs
    return total


def count_valid(mask):
    n_tok = 0
    n_seq = 0
    for row in mask.tolist():
        k = sum(1 for x in row if x)
        n_tok += k
        n_seq += 1 if k else 0
    return n_tok, n_seq


def loss_kwargs(cfg, mask):
    """``loop_policy_loss`` keyword arguments from a PolicyLossConfig-like object (attributes only)."""
    n_tok, n_seq = count_valid(mask)
    return dict(
        clip_low=cfg.ratio_clip_low,
        clip_high=cfg.ratio_clip_high,
        clip_c=cfg.ratio_clip_c,
        aggregation=cfg.aggregation,
        importance_ratio=cfg.importance_ratio,
        n_tokens=n_tok,
        n_seqs=n_seq,
    )


# ----------------------------------------------------------------------------------------------
# OCC proxies and λ (Eq. 12-13)


def loop_proxies(main, old, mtp, mask, mtp_old=None):
    """(ĉ, v̂², n, Σ per-token ratio numerators as pairs) with Python floats."""
    mtp_old = old if mtp_old is None else mtp_old
    pairs = []
    for i in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            if bool(mask[i, t]):
                d_rl = float(main[i, t]) - float(old[i, t])
                d_mtp = float(mtp[i, t]) - float(mtp_old[i, t])
                pairs.append((d_rl, d_mtp))
    c = sum(a * b for a, b in pairs)
    v2 = sum(b * b for _, b in pairs)
    return c, v2, pairs


def loop_lambda(
    main, old, mtp, mask, *, lambda_plus=1.0, eps=1e-8, estimator="signed", lambda_max=None, mtp_old=None
):
    c, v2, pairs = loop_proxies(main, old, mtp, mask, mtp_old)
    if not pairs:
        return 0.0
    if estimator == "reference":
        lam = lambda_plus * sum(a * b / (b * b + eps) for a, b in pairs) / len(pairs)
    elif estimator == "clipped":
        lam = lambda_plus * (c if c > 0 else 0.0) / (v2 + eps)
    else:
        lam = lambda_plus * c / (v2 + eps)
    if lambda_max is not None:
        lam = min(lambda_max, max(-lambda_max, lam))
    return lam


# ----------------------------------------------------------------------------------------------
# alignment, one document at a time


def documents(length, cu_seqlens=None):
    """[(start, end)] of each document of a row; trailing padding after the last boundary is its own."""
    if cu_seqlens is None:
        return [(0, length)]
    cu = [int(x) for x in cu_seqlens]
    docs = [(cu[k], cu[k + 1]) for k in range(len(cu) - 1)]
    if cu[-1] < length:
        docs.append((cu[-1], length))
    return docs


def loop_targets(ids, depth, cu_seqlens=None):
    """tok[p + 1 + depth] inside p's document, else (0, invalid)."""
    B, S = ids.shape
    tgt = torch.zeros_like(ids)
    valid = torch.zeros(B, S, dtype=torch.bool)
    for b in range(B):
        for s, e in documents(S, cu_seqlens):
            for p in range(s, e):
                q = p + 1 + depth
                if q < e:
                    tgt[b, p] = ids[b, q]
                    valid[b, p] = True
    return tgt, valid


def loop_align(values, depth, cu_seqlens=None, fill=0.0):
    """aligned[j] = values[j - depth] when j - depth and j + 1 lie in j's document."""
    B, S = values.shape
    out = torch.full_like(values, fill)
    valid = torch.zeros(B, S, dtype=torch.bool)
    for b in range(B):
        for s, e in documents(S, cu_seqlens):
            for j in range(s, e):
                if j - depth >= s:
                    out[b, j] = values[b, j - depth]
                    valid[b, j] = j + 1 < e
    return out, valid


# ----------------------------------------------------------------------------------------------
# tiny model with one main head and K MTP depths (float64)


class TinyMTPModel(torch.nn.Module):
    """Embedding -> tanh trunk -> shared output head; depth d mixes the previous depth's hidden
    state with the embedding of the token d steps ahead (Megatron/DeepSeek MTP, reduced)."""

    def __init__(self, V=11, H=6, K=1, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = torch.nn.Parameter(torch.randn(V, H, generator=g, dtype=torch.float64) * 0.5)
        self.trunk = torch.nn.Parameter(torch.randn(H, H, generator=g, dtype=torch.float64) * 0.5)
        self.head = torch.nn.Parameter(torch.randn(V, H, generator=g, dtype=torch.float64) * 0.5)
        self.mtp = torch.nn.ParameterList(
            [
                torch.nn.Parameter(torch.randn(H, 2 * H, generator=g, dtype=torch.float64) * 0.5)
                for _ in range(K)
            ]
        )

    def full_logprobs(self, ids):
        """Main [B, S, V] log-softmax at every position and, per depth d, the MTP [B, S, V] one at
        Megatron positions (position i of depth d predicts ids[i+1+d])."""
        S = ids.shape[1]
        h = torch.tanh(self.emb[ids] @ self.trunk)  # [B, S, H]
        main = F.log_softmax(h @ self.head.t(), dim=-1)
        depths = []
        prev = h
        for d, w in enumerate(self.mtp, start=1):
            nxt = torch.zeros_like(prev)
            nxt[:, : S - d] = self.emb[ids[:, d:]]  # embedding of tok[i+d] at position i
            prev = torch.tanh(torch.cat([prev, nxt], dim=-1) @ w.t())  # [B, S, H]
            depths.append(F.log_softmax(prev @ self.head.t(), dim=-1))
        return main, depths

    def forward(self, ids):
        """Main log-probs [B, S-1] (index j scores ids[j+1]) and per depth d the MTP log-probs at
        main positions [B, S-1] (index j scores ids[j+1], from MTP position j-d) with their
        validity [B, S-1]; vectorised (``forward_loops`` is the same, one token at a time)."""
        B, S = ids.shape
        main_full, depths = self.full_logprobs(ids)
        main = main_full[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
        mtp_out, masks = [], []
        for d, logp in enumerate(depths, start=1):
            lp = logp[:, : S - 1 - d].gather(-1, ids[:, d + 1 :, None])[..., 0]  # [B, S-1-d]
            mtp_out.append(torch.cat([lp.new_zeros(B, d), lp], dim=1))
            valid = torch.ones(B, S - 1, dtype=torch.bool)
            valid[:, :d] = False
            masks.append(valid)
        return main, mtp_out, masks

    def forward_loops(self, ids):
        """``forward`` gathered one token at a time."""
        B, S = ids.shape
        main_full, depths = self.full_logprobs(ids)
        main = torch.stack(
            [torch.stack([main_full[b, j, ids[b, j + 1]] for j in range(S - 1)]) for b in range(B)]
        )
        mtp_out, masks = [], []
        for d, logp in enumerate(depths, start=1):
            valid = torch.zeros(B, S - 1, dtype=torch.bool)
            rows = []
            for b in range(B):
                row = []
                for j in range(S - 1):
                    if j - d >= 0:
                        row.append(logp[b, j - d, ids[b, j + 1]])
                        valid[b, j] = True
                    else:
                        row.append(logp.new_zeros(()))
                rows.append(torch.stack(row))
            mtp_out.append(torch.stack(rows))
            masks.append(valid)
        return main, mtp_out, masks


def flat_grad_by_backward(loss, params):
    """Gradient of ``loss`` flattened, via .backward() into .grad (zeros where unreached)."""
    for p in params:
        p.grad = None
    loss.backward(retain_graph=True)
    out = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    for p in params:
        p.grad = None
    return out


def close_metrics(owner, *args, **kwargs):
    """``owner.close_update(...)`` (an MTPObjective or OCCCalibrator) as the metrics of a one-update step."""
    from nemo_occ.core.metrics import step_metrics

    update = owner.close_update(*args, **kwargs)
    return {} if update is None else step_metrics([update])
