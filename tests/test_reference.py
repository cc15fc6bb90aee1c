"""The references themselves, checked against independent PyTorch formulations.

Paged attention is round-tripped through padding: each sequence's paged KV is gathered into
a contiguous tensor and run through torch's SDPA with an explicit bottom-right mask.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from kernels import reference as ref
from tests.attention_cases import attn_args, make_batch


@pytest.mark.parametrize("window,softcap", [(None, None), (7, None), (None, 5.0)])
def test_paged_attention_reference_vs_sdpa(window, softcap):
    q_lens, kv_lens = [1, 17, 5, 0, 3], [40, 17, 97, 9, 3]
    b = make_batch(q_lens, kv_lens, num_q_heads=10, num_kv_heads=2, head_dim=24, block_size=16,
                   dtype=torch.float64)
    out = ref.paged_attention(*attn_args(b), sliding_window=window, softcap=softcap)
    cu = b["cu_seqlens_q"].tolist()
    for i, (ql, kl) in enumerate(zip(q_lens, kv_lens)):
        if ql == 0:
            continue
        k = b["k_cache"][b["block_table"][i].long()].flatten(0, 1)[:kl]      # padded gather
        v = b["v_cache"][b["block_table"][i].long()].flatten(0, 1)[:kl]
        q = b["q"][cu[i]:cu[i + 1]].transpose(0, 1)
        k = k.repeat_interleave(5, 1).transpose(0, 1)
        v = v.repeat_interleave(5, 1).transpose(0, 1)
        qpos = torch.arange(ql)[:, None] + kl - ql
        kpos = torch.arange(kl)[None]
        allowed = (kpos <= qpos) & ((kpos > qpos - window) if window else True)
        if softcap:
            s = softcap * torch.tanh(q @ k.transpose(1, 2) / math.sqrt(24) / softcap)
            expect = torch.softmax(s.masked_fill(~allowed, -math.inf), -1) @ v
        else:
            expect = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        torch.testing.assert_close(out[cu[i]:cu[i + 1]], expect.transpose(0, 1), rtol=1e-12, atol=1e-12)


def test_write_kv_reference_skips_negative_slots():
    kc = torch.zeros(4, 16, 2, 8, dtype=torch.float64)
    vc = torch.zeros_like(kc)
    key, val = torch.randn(3, 2, 8, dtype=torch.float64), torch.randn(3, 2, 8, dtype=torch.float64)
    ref.write_kv(key, val, kc, vc, torch.tensor([5, -1, 63]))
    assert torch.equal(kc[0, 5], key[0]) and torch.equal(vc[3, 15], val[2])
    assert kc.abs().sum() == key[0].abs().sum() + key[2].abs().sum()


def test_rms_norm_reference_matches_definition():
    x, r, w = torch.randn(5, 33, dtype=torch.float64), torch.randn(5, 33, dtype=torch.float64), torch.randn(33, dtype=torch.float64)
    y, s = ref.rms_norm(x, w, 1e-5, residual=r)
    torch.testing.assert_close(s, x + r)
    torch.testing.assert_close(y, w * s / torch.sqrt((s * s).mean(-1, keepdim=True) + 1e-5))


def test_rotary_reference_is_a_rotation_by_position():
    rot = 16
    cache = ref.rope_cos_sin_cache(rot, 64, base=10000.0, dtype=torch.float64)
    q = torch.randn(3, 2, 20, dtype=torch.float64)
    pos = torch.tensor([0, 5, 63])
    qr, _ = ref.rotary_embedding(pos, q, q.clone(), cache)
    torch.testing.assert_close(qr[0], q[0])                        # position 0: identity
    torch.testing.assert_close(qr[..., rot:], q[..., rot:])        # partial rotary passes through
    torch.testing.assert_close(qr.norm(dim=-1), q.norm(dim=-1))    # rotations keep the norm
    # complex-number form: (x1 + i x2) * e^{i theta}
    theta = pos[:, None].double() * (1.0 / 10000.0 ** (torch.arange(0, rot, 2).double() / rot))
    z = torch.complex(q[..., :rot // 2], q[..., rot // 2:rot]) * torch.polar(torch.ones_like(theta), theta)[:, None]
    torch.testing.assert_close(qr[..., :rot // 2], z.real)
    torch.testing.assert_close(qr[..., rot // 2:rot], z.imag)


def test_llama3_rope_scaling_matches_transformers():
    import transformers as tr      # a requirement: its absence must fail, not skip
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    cfg = tr.LlamaConfig(hidden_size=128 * 4, num_attention_heads=4, rope_theta=500000.0,
                         rope_scaling=scaling, max_position_embeddings=131072)
    hf_inv, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    ours = ref.rope_inv_freq(128, 500000.0, scaling)
    torch.testing.assert_close(ours, hf_inv.float(), rtol=1e-6, atol=0)
    assert not torch.allclose(ours, ref.rope_inv_freq(128, 500000.0))   # scaling did something


def test_silu_and_mul_reference():
    x = torch.randn(4, 10, dtype=torch.float64)
    torch.testing.assert_close(ref.silu_and_mul(x), x[:, :5] * torch.sigmoid(x[:, :5]) * x[:, 5:])
