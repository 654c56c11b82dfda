"""Reach: Hugging Face architectures we did not write, each built tiny from its config with random
weights (never downloaded), converted and run.

For every model: (a) the converted forward runs; (b) every product ran on the device (device MAC
share 1.0, no ``DigitalProductWarning``); (c) the output is finite; (d) on the near-ideal device
(preset ``ideal``: 16-bit DACs, 24-bit ADC, G = 1, no noise) the output is within 1e-3 (relative
L2) of float32, and on the default 8/8/8 device (noise one bin wide) further away, below 1.
Also ``generate()`` with the KV cache on tiny GPT-2 and Llama, ``abfp.summary``, straight-through
gradients, and torch's packed recurrent layers.
``python tests/reach/test_hf_models.py`` prints the table of docs/families.md ("Reach").
"""

from __future__ import annotations

import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # configs only: nothing is ever downloaded

import pytest
import torch
from torch import nn

import abfp
from abfp import ABFPConfig
from abfp.ops.coverage import DigitalProductWarning

T = pytest.importorskip("transformers", reason="the reach sweep needs transformers (the zoo extra installs it)")

IDEAL = ABFPConfig.preset("ideal")
DEFAULT = ABFPConfig(execution=abfp.ExecutionOptions(seed=0))
B, S = 2, 8
H = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
AUDIO = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, conv_dim=(16, 16),
             conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=4)
SEQ2SEQ = dict(vocab_size=100, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
               decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, pad_token_id=0, bos_token_id=1,
               eos_token_id=2, decoder_start_token_id=1)


def _ids() -> torch.Tensor:
    return torch.randint(3, 100, (B, S), generator=torch.Generator().manual_seed(1))


def _mask() -> torch.Tensor:
    m = torch.ones(B, S, dtype=torch.long)
    m[1, 6:] = 0  # one padded sequence: the mask path runs too
    return m


def text(cls, cfg, **kw):
    return lambda: (cls(cfg(vocab_size=100, **kw)), (), dict(input_ids=_ids(), attention_mask=_mask()))


def lm(cls, cfg, **kw):
    return lambda: (cls(cfg(vocab_size=100, **kw)), (), dict(input_ids=_ids()))


def seq2seq(cls, cfg, **kw):
    return lambda: (cls(cfg(**SEQ2SEQ, **kw)), (), dict(input_ids=_ids(), attention_mask=_mask(),
                                                         decoder_input_ids=_ids()[:, :5]))


def image(cls, cfg, size=32, **kw):
    return lambda: (cls(cfg(**kw)), (torch.randn(B, 3, size, size),), {})


def audio(cls, cfg, **kw):
    return lambda: (cls(cfg(**AUDIO, **kw)), (torch.randn(B, 400),), {})


def speech(cls, cfg, feats, **kw):
    return lambda: (cls(cfg(**SEQ2SEQ, **kw)), (torch.randn(B, *feats),), dict(decoder_input_ids=_ids()[:, :4]))


#: name -> factory of (model, args, kwargs); what each brings that the others do not.
MODELS = {
    "gpt2": lm(T.GPT2Model, T.GPT2Config, n_embd=32, n_layer=2, n_head=4, n_positions=32),  # Conv1D: addmm
    "gpt2-eager": lm(T.GPT2Model, T.GPT2Config, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                     attn_implementation="eager"),  # attention as matmul, softmax, matmul
    "bert": text(T.BertModel, T.BertConfig, max_position_embeddings=32, **H),
    "distilbert": text(T.DistilBertModel, T.DistilBertConfig, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                       max_position_embeddings=32),
    "roberta": text(T.RobertaModel, T.RobertaConfig, max_position_embeddings=40, **H),
    "albert": text(T.AlbertModel, T.AlbertConfig, embedding_size=16, max_position_embeddings=32, **H),  # shared layers
    "deberta-v2": text(T.DebertaV2Model, T.DebertaV2Config, max_position_embeddings=32, relative_attention=True,
                       pos_att_type=["p2c", "c2p"], **H),  # disentangled attention: gathers of products
    "convbert": text(T.ConvBertModel, T.ConvBertConfig, embedding_size=32, max_position_embeddings=32, **H),
    "nystromformer": lambda: (T.NystromformerModel(T.NystromformerConfig(
        vocab_size=100, max_position_embeddings=64, num_landmarks=4, segment_means_seq_len=16, conv_kernel_size=3, **H)),
        (), dict(input_ids=torch.randint(3, 100, (B, 16), generator=torch.Generator().manual_seed(1)))),  # pinv by matmuls
    "bigbird": text(T.BigBirdModel, T.BigBirdConfig, max_position_embeddings=64, attention_type="original_full", **H),
    "longformer": text(T.LongformerModel, T.LongformerConfig, max_position_embeddings=40, attention_window=4, **H),
    "t5": lambda: (T.T5Model(T.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                        relative_attention_num_buckets=8)),
                   (), dict(input_ids=_ids(), attention_mask=_mask(), decoder_input_ids=_ids()[:, :5])),
    "bart": seq2seq(T.BartModel, T.BartConfig, max_position_embeddings=32),
    "marian": seq2seq(T.MarianModel, T.MarianConfig, max_position_embeddings=32),
    "llama": lm(T.LlamaModel, T.LlamaConfig, max_position_embeddings=32, num_key_value_heads=2, **H),  # rotary, GQA
    "llama-eager": lm(T.LlamaModel, T.LlamaConfig, max_position_embeddings=32, num_key_value_heads=2,
                      attn_implementation="eager", **H),
    "mistral": lm(T.MistralModel, T.MistralConfig, max_position_embeddings=32, num_key_value_heads=2, **H),
    "qwen2": lm(T.Qwen2Model, T.Qwen2Config, max_position_embeddings=32, num_key_value_heads=2, **H),
    "gemma3": lm(T.Gemma3TextModel, T.Gemma3TextConfig, max_position_embeddings=32, num_key_value_heads=2, head_dim=8,
                 sliding_window=4, **H),
    "mixtral": lm(T.MixtralModel, T.MixtralConfig, max_position_embeddings=32, num_key_value_heads=2,
                  num_local_experts=4, num_experts_per_tok=2, **H),  # mixture of experts
    "bloom": lm(T.BloomModel, T.BloomConfig, hidden_size=32, n_layer=2, n_head=4),  # ALiBi: baddbmm
    "falcon": lm(T.FalconModel, T.FalconConfig, hidden_size=32, num_hidden_layers=2, num_attention_heads=4),
    "gpt-neox": lm(T.GPTNeoXModel, T.GPTNeoXConfig, max_position_embeddings=32, **H),
    "gptj": lm(T.GPTJModel, T.GPTJConfig, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=32),
    "opt": lm(T.OPTModel, T.OPTConfig, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
              max_position_embeddings=32, word_embed_proj_dim=32),
    "mpt": lm(T.MptModel, T.MptConfig, d_model=32, n_layers=2, n_heads=4, max_seq_len=32),
    "xlnet": lm(T.XLNetModel, T.XLNetConfig, d_model=32, n_layer=2, n_head=4, d_inner=64),  # einsum attention
    "funnel": lm(T.FunnelModel, T.FunnelConfig, d_model=32, block_sizes=[1, 1], n_head=4, d_head=8, d_inner=64),
    "reformer": lm(T.ReformerModel, T.ReformerConfig, hidden_size=32, attention_head_size=8, num_attention_heads=4,
                   attn_layers=["local", "lsh"], feed_forward_size=64, axial_pos_embds=False,
                   max_position_embeddings=32, local_attn_chunk_length=4, lsh_attn_chunk_length=4, num_buckets=2),
    "mamba": lm(T.MambaModel, T.MambaConfig, hidden_size=32, num_hidden_layers=2, state_size=4, expand=2,
                conv_kernel=4),  # depthwise causal conv1d, selective scan
    "mamba2": lm(T.Mamba2Model, T.Mamba2Config, hidden_size=32, num_hidden_layers=1, state_size=4, expand=2,
                 conv_kernel=4, num_heads=8, head_dim=8, n_groups=1, chunk_size=4),
    "rwkv": lm(T.RwkvModel, T.RwkvConfig, hidden_size=32, num_hidden_layers=2, attention_hidden_size=32,
               intermediate_size=64, context_length=32),
    "recurrent-gemma": lm(T.RecurrentGemmaModel, T.RecurrentGemmaConfig, hidden_size=32, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=1, intermediate_size=64, lru_width=32,
                          attention_window_size=4, block_types=["recurrent", "attention"], head_dim=8),
    "fnet": lm(T.FNetModel, T.FNetConfig, hidden_size=32, num_hidden_layers=2, intermediate_size=64,
               max_position_embeddings=32),  # Fourier mixing: FFTs are no products, digital
    "vit": image(T.ViTModel, T.ViTConfig, 16, image_size=16, patch_size=4, **H),
    "dinov2": image(T.Dinov2Model, T.Dinov2Config, 16, image_size=16, patch_size=4, **H),
    "beit": image(T.BeitModel, T.BeitConfig, 16, image_size=16, patch_size=4, use_relative_position_bias=True, **H),
    "swin": image(T.SwinModel, T.SwinConfig, image_size=32, patch_size=4, embed_dim=16, depths=[1, 1],
                  num_heads=[2, 2], window_size=4),
    "swinv2": image(T.Swinv2Model, T.Swinv2Config, image_size=32, patch_size=4, embed_dim=16, depths=[1, 1],
                    num_heads=[2, 2], window_size=4),  # cosine attention
    "convnext": image(T.ConvNextModel, T.ConvNextConfig, num_stages=2, hidden_sizes=[16, 32], depths=[1, 1]),
    "resnet": image(T.ResNetModel, T.ResNetConfig, embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1],
                    layer_type="basic"),
    "regnet": image(T.RegNetModel, T.RegNetConfig, embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1],
                    groups_width=8),  # grouped convolutions
    "levit": image(T.LevitModel, T.LevitConfig, 64, image_size=64, hidden_sizes=[32, 48, 64],
                   num_attention_heads=[2, 2, 2], depths=[1, 1, 1], key_dim=[8, 8, 8]),
    "segformer": image(T.SegformerModel, T.SegformerConfig, num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1],
                       hidden_sizes=[16, 32], num_attention_heads=[1, 2], mlp_ratios=[2, 2], patch_sizes=[7, 3],
                       strides=[4, 2]),
    "whisper": speech(T.WhisperModel, T.WhisperConfig, (16, 32), num_mel_bins=16, max_source_positions=16,
                      max_target_positions=16),  # conv1d front end, encoder-decoder
    "speech2text": speech(T.Speech2TextModel, T.Speech2TextConfig, (20, 16), input_feat_per_channel=16,
                          conv_channels=16, max_source_positions=64, max_target_positions=16),
    "wav2vec2": audio(T.Wav2Vec2Model, T.Wav2Vec2Config),  # grouped positional conv1d
    "hubert": audio(T.HubertModel, T.HubertConfig),
    "wavlm": audio(T.WavLMModel, T.WavLMConfig, num_buckets=16, max_bucket_distance=20),  # gated relative bias
    "encodec": lambda: (T.EncodecModel(T.EncodecConfig(
        hidden_size=16, num_filters=4, num_residual_layers=1, upsampling_ratios=[2, 2], codebook_size=16,
        codebook_dim=16, num_lstm_layers=1, sampling_rate=800, target_bandwidths=[1.5])),
        (torch.randn(1, 1, 64),), {}),  # conv1d, LSTM, transposed conv1d; the codebook look-up is digital
    "clip": lambda: (T.CLIPModel(T.CLIPConfig(
        text_config=dict(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=16),
        vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                           image_size=16, patch_size=4), projection_dim=16)),
        (), dict(input_ids=_ids(), pixel_values=torch.randn(B, 3, 16, 16))),
    "perceiver": lambda: (T.PerceiverModel(T.PerceiverConfig(num_latents=8, d_latents=32, d_model=32, num_blocks=1,
                                                             num_self_attends_per_block=1, num_self_attention_heads=4,
                                                             num_cross_attention_heads=4)),
                          (), dict(inputs=torch.randn(B, S, 32))),
    "patchtst": lambda: (T.PatchTSTModel(T.PatchTSTConfig(num_input_channels=2, context_length=32, patch_length=4,
                                                          patch_stride=4, d_model=32, num_hidden_layers=1,
                                                          num_attention_heads=4, ffn_dim=64)),
                         (), dict(past_values=torch.randn(B, 32, 2))),
}


def output(o) -> torch.Tensor:
    """The model's main float output: CLIP's two embeddings, else the first hidden state."""
    if isinstance(o, torch.Tensor):
        return o
    if getattr(o, "text_embeds", None) is not None:
        return torch.cat([o.text_embeds.flatten(), o.image_embeds.flatten()])
    if getattr(o, "audio_values", None) is not None:  # EnCodec: the decoded audio, not its integer codes
        return o.audio_values
    if getattr(o, "last_hidden_state", None) is not None:
        return o.last_hidden_state
    return o[0]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def build(name: str):
    torch.manual_seed(0)
    model, args, kwargs = MODELS[name]()
    return model.eval(), args, kwargs


def run_converted(model, args, kwargs, cfg):
    """(output, coverage, abfp warnings) of ``model`` converted with ``cfg``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DigitalProductWarning)
        cm = abfp.convert(model, cfg)
        with torch.no_grad():
            out = output(cm(*args, **kwargs))
    return out, abfp.coverage(cm), [str(w.message) for w in caught if issubclass(w.category, DigitalProductWarning)]


def measure(name: str) -> dict:
    model, args, kwargs = build(name)
    with torch.no_grad():
        ref = output(model(*args, **kwargs))
    row = {"model": name}
    for label, cfg in (("ideal", IDEAL), ("default", DEFAULT)):
        out, cov, warned = run_converted(model, args, kwargs, cfg)
        row.update({f"{label}_rel": rel(out, ref), f"{label}_finite": bool(torch.isfinite(out).all()),
                    f"{label}_share": cov.share, f"{label}_warned": warned, "macs": cov.total_macs})
    return row


@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_model_we_have_not_seen_runs_wholly_on_the_device(name):
    r = measure(name)
    assert r["macs"] > 0
    for label in ("ideal", "default"):
        assert r[f"{label}_share"] == 1.0 and not r[f"{label}_warned"], (label, r)
        assert r[f"{label}_finite"], (label, r)
    assert r["ideal_rel"] < 1e-3, r
    assert r["ideal_rel"] < r["default_rel"] < 1.0, r


def test_longformer_mask_of_float32_min_through_an_einsum_runs():
    """Longformer's diagonal mask is ``einsum(ones, mask)`` with masked entries at
    ``torch.finfo(float32).min``: its bfloat16 block scale rounded to ``inf`` and the product
    came out NaN (``ValueError`` at the next product). Scales now saturate at bfloat16's max."""
    model, args, kwargs = build("longformer")
    with torch.no_grad():
        ref = output(model(*args, **kwargs))
    out, cov, _ = run_converted(model, args, kwargs, DEFAULT)
    assert torch.isfinite(out).all() and cov.share == 1.0
    assert rel(out, ref) < 0.05


@pytest.mark.parametrize("name", ["gpt2", "t5", "whisper", "longformer", "encodec"])
def test_summary_lists_every_product_of_a_model_we_have_not_seen(name):
    model, args, kwargs = build(name)
    with torch.no_grad():
        s = abfp.summary(model, args, DEFAULT, kwargs=kwargs, errors=False)
    assert s.device_mac_share == 1.0 and s.coverage.digital_macs == 0
    assert s.rows and sum(r.macs for r in s.rows) == s.coverage.analog_macs
    assert not any(r.kind == "digital" for r in s.rows)


@pytest.mark.parametrize("name", ["gpt2", "t5", "convnext", "whisper", "mamba"])
def test_gradients_through_a_model_we_have_not_seen_are_float32s_on_the_ideal_device(name):
    """Straight-through gradients (QAT, finetuning): on the ideal device every parameter's
    gradient is within 1e-3 of float32's (eval mode: no dropout), and on the default one finite."""
    model, args, kwargs = build(name)
    with torch.no_grad():
        shape = output(model(*args, **kwargs)).shape
    direction = torch.randn(shape, generator=torch.Generator().manual_seed(4))  # (a norm's output has a fixed size)

    def grads(m):
        m.zero_grad(set_to_none=True)
        (output(m(*args, **kwargs)) * direction).sum().backward()
        return {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None}

    want = grads(model)
    got = grads(abfp.convert(model, IDEAL))
    assert got.keys() == want.keys() and want
    for k in want:
        if want[k].norm() > 0:
            assert rel(got[k], want[k]) < 1e-3, k
    assert all(torch.isfinite(g).all() for g in grads(abfp.convert(model, DEFAULT)).values())


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_generate_with_the_kv_cache_runs_on_the_device(arch):
    """``generate()`` (greedy, KV cache): the ideal device picks float32's tokens; every step's
    products are analog."""
    torch.manual_seed(0)
    ids = dict(vocab_size=100, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    if arch == "gpt2":
        model = T.GPT2LMHeadModel(T.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=32, **ids))
    else:
        model = T.LlamaForCausalLM(T.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                 num_key_value_heads=2, intermediate_size=64,
                                                 max_position_embeddings=32, **ids))
    model.eval()
    prompt = torch.randint(2, 100, (2, 5), generator=torch.Generator().manual_seed(3))
    gen = dict(max_new_tokens=4, do_sample=False, attention_mask=torch.ones_like(prompt))
    with torch.no_grad():
        want = model.generate(prompt, **gen)
        for cfg in (IDEAL, DEFAULT):
            cm = abfp.convert(model, cfg)
            got = cm.generate(prompt, **gen)
            assert got.shape == want.shape and abfp.coverage(cm).share == 1.0
            assert abfp.coverage(cm).analog_macs > 0
            if cfg is IDEAL:
                assert torch.equal(got, want)


@pytest.mark.parametrize("layer", [
    nn.GRU(8, 16, num_layers=2, bidirectional=True, batch_first=True),
    nn.RNN(8, 16, nonlinearity="relu", batch_first=True),
    nn.LSTM(8, 16, batch_first=True, bidirectional=True, proj_size=4),
], ids=["gru-bidirectional", "rnn-relu", "lstm-proj"])
def test_packed_recurrent_layers_run_on_the_device(layer):
    torch.manual_seed(0)
    x = torch.randn(3, 6, 8)
    packed = nn.utils.rnn.pack_padded_sequence(x, torch.tensor([6, 4, 2]), batch_first=True, enforce_sorted=False)
    with torch.no_grad():
        want = layer.eval()(packed)[0].data
        cm = abfp.convert(layer, IDEAL)
        got = cm(packed)[0].data
    assert abfp.coverage(cm).share == 1.0 and rel(got, want) < 1e-3


if __name__ == "__main__":  # the table of docs/families.md
    torch.set_num_threads(1)
    print("| model | product sites | MACs | device MAC share | rel. error ideal | rel. error default 8/8/8 |")
    print("|---|---:|---:|---:|---:|---:|")
    for n in sorted(MODELS):
        r = measure(n)
        m, a, kw = build(n)
        with torch.no_grad():
            sites = len(abfp.summary(m, a, DEFAULT, kwargs=kw, errors=False).rows)
        share = min(r["ideal_share"], r["default_share"])
        print(f"| {n} | {sites} | {r['macs']:,} | {100 * share:.1f} % | {r['ideal_rel']:.1e} | {r['default_rel']:.1e} |")


def test_compiled_flex_attention_is_refused_and_sdpa_runs_on_the_device() -> None:
    """A model set to HF's flex_attention (its own torch.compile: products out of sight, float32,
    uncounted) is refused by name before anything is converted; switched to sdpa it converts, and
    every product is on the device."""
    cfg = T.LlamaConfig(vocab_size=100, **H)
    cfg._attn_implementation = "flex_attention"
    model = T.LlamaForCausalLM(cfg).eval()
    with pytest.raises(ValueError, match="flex_attention.*sdpa"):
        abfp.convert(model, IDEAL)
    assert not abfp.is_converted(model)
    model.set_attn_implementation("sdpa")
    converted = abfp.convert(model, IDEAL)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DigitalProductWarning)
        with torch.no_grad():
            converted(input_ids=_ids())
    eager = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=100, **H)).eval()
    eager.set_attn_implementation("eager")  # attention as plain matmuls: the count to meet
    eager = abfp.convert(eager, IDEAL)
    with torch.no_grad():
        eager(input_ids=_ids())
    cov = abfp.coverage(converted)
    assert cov.share == 1.0 and cov.analog_macs == abfp.coverage(eager).analog_macs > 0
