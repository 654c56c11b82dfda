"""MAC audit: abfp's own count of every product, against an independent count, on architectures users bring.

The independent count is torch's ``FlopCounterMode`` on the float32 model (MACs = FLOPs / 2). It
counts at the aten level: ``mm``, ``addmm``, ``bmm``, ``baddbmm`` (2 M N K), ``convolution`` (2 x
batch x prod(weight shape) x prod(output spatial), the input's for a transposed one: the same per
input element) and the fused attention kernels (2 x the ``QK^T`` and ``AV`` bmm's). So that every
product reaches it as one of those, the float32 model runs with SDPA's math backend (two bmm's),
oneDNN off (torch's CPU LSTM is otherwise one fused ``mkldnn_rnn_layer``, not counted) and the
``nn.MultiheadAttention``/``TransformerEncoderLayer`` fast path off (a fused kernel); ``mv``,
``addmv``, ``dot``, ``vdot``, ``addbmm`` and the in-place ``addmm_``, ``addmv_``, ``baddbmm_``,
``addbmm_``, which it does not count, are given to it here as ``2 x M x K`` and ``2 x B x M x K x N``
(:data:`_UNCOUNTED`).

For every model of the catalog (plain PyTorch, Hugging Face ``transformers`` built tiny from their
configs and a sentence-transformers pipeline, never downloaded), converted on the default device:

1. the device's MACs (``abfp.coverage``) equal the independent count plus the documented
   conventions of :data:`CONVENTIONS` (products torch computes with an element-wise ``mul``, which
   the device computes as K = 1 products), with no digital MAC and no ``DigitalProductWarning``;
2. converted with every module excluded, the same MACs are counted as digital (none analog), so a
   product in an excluded module counts what it does (an LSTM, an MHA, an einsum were counted 0);
3. no aten product ran in float32 on operands that are not DAC codes (:class:`FloatProducts`, a
   dispatch-level spy that does see the excluded model's float32 products);
4. every product equals the ``reference`` kernel (SPEC in float64) on the same operands, on the
   noise-free device, within float32 rounding; and the converted output differs from float32.

Whole-model outputs of the fast and reference kernels are not compared: both compute each product
to within one float32 rounding of the other, and the device's outputs lie on a lattice (ADC codes
times scales), so a later product's input sometimes sits exactly on a DAC rounding tie, where that
rounding flips one code (seen in a 2-layer ``TransformerEncoder``: an out-projection input of
60.499996 against 60.5); a softmax after it spreads the flip over a row.
"""

from __future__ import annotations

import math
import os
import warnings
from contextlib import contextmanager, nullcontext

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # configs only: nothing is ever downloaded

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

import abfp
from abfp.nn.convert import analog_state
from abfp.ops.coverage import DigitalProductWarning

aten = torch.ops.aten
DEFAULT = abfp.ABFPConfig(execution=abfp.ExecutionOptions(seed=0))
R = torch.randn

#: products FlopCounterMode has no formula for (vector products, addbmm, the in-place forms), in its FLOPs (2 x MACs)
_UNCOUNTED = {
    aten.mv: lambda a, v, **_: 2 * a[0] * a[1],
    aten.addmv: lambda c, a, v, **_: 2 * a[0] * a[1],
    aten.addmv_: lambda c, a, v, **_: 2 * a[0] * a[1],
    aten.dot: lambda a, b, **_: 2 * a[0],
    aten.vdot: lambda a, b, **_: 2 * a[0],
    aten.addbmm: lambda c, a, b, **_: 2 * a[0] * a[1] * a[2] * b[2],
    aten.addbmm_: lambda c, a, b, **_: 2 * a[0] * a[1] * a[2] * b[2],
    aten.addmm_: lambda c, a, b, **_: 2 * a[0] * a[1] * b[1],
    aten.baddbmm_: lambda c, a, b, **_: 2 * a[0] * a[1] * a[2] * b[2],
}


@contextmanager
def _no_mha_fast_path():
    was = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(was)


def independent_macs(model: nn.Module, args: tuple, kwargs: dict) -> int:
    """MACs of the float32 model by torch's FlopCounterMode (see the module docstring).

    Counted under ``torch.no_grad()``; where FlopCounterMode's module tracker cannot hook a
    module's input (a view made under ``no_grad`` of a parameter: torch's
    ``register_multi_grad_hook`` asserts "Expected gradient function to be set"; transformers
    5.25's hub-kernel layers pass such views, e.g. Mamba's causal conv1d), counted again with
    gradients enabled (the forward is the same; nothing is run backward)."""
    def count(grad: bool) -> int:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.backends.mkldnn.flags' TF32 deprecation note
            with torch.set_grad_enabled(grad), torch.backends.mkldnn.flags(enabled=False), \
                    sdpa_kernel(SDPBackend.MATH), _no_mha_fast_path(), \
                    getattr(model, "flop_counter_stand_in", nullcontext)(), \
                    FlopCounterMode(display=False, custom_mapping=_UNCOUNTED) as fc:
                model(*args, **kwargs)
        return fc.get_total_flops()

    try:
        flops = count(False)
    except AssertionError as e:
        if "Expected gradient function to be set" not in str(e):
            raise
        flops = count(True)
    assert flops % 2 == 0
    return flops // 2


#: aten products; a float32 one among them during a converted forward is a product off the device
_ATEN_PRODUCTS = {"mm", "bmm", "addmm", "baddbmm", "addbmm", "mv", "addmv", "dot", "vdot", "convolution",
                  "_convolution", "_trilinear", "mkldnn_rnn_layer", "mkldnn_convolution", "_slow_conv2d_forward", "addmm_", "addmv_", "baddbmm_", "addbmm_",
                  "slow_conv3d_forward", "slow_conv_transpose2d", "slow_conv_transpose3d",
                  "_scaled_dot_product_flash_attention_for_cpu", "_transformer_encoder_layer_fwd",
                  "_native_multi_head_attention", "addr", "outer"}


class FloatProducts(TorchDispatchMode):
    """Counts aten products run on two or more float operands that are not integer-valued: the
    device's own GEMMs multiply DAC codes (integers, as int8 or float), never float32 values."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: dict[str, int] = {}

    supports_higher_order_operators = True  # flex_attention's operator: float32 products, counted as one call

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if isinstance(func, torch._ops.HigherOrderOperator):
            self.seen[func.name()] = self.seen.get(func.name(), 0) + 1
            return func(*args, **(kwargs or {}))  # torch took the spy off for this call
        name = func.overloadpacket.__name__
        if name in _ATEN_PRODUCTS:
            floats = [t for t in args if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel()]
            if sum(not bool((t == t.round()).all()) for t in floats) >= 2:
                self.seen[name] = self.seen.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


# ----------------------------------------------------------------------------- the catalog: plain PyTorch
class UNet2d(nn.Module):
    """Encoder-decoder with skips: convolutions (grouped, depthwise, dilated, reflect padding),
    batch norm, max pooling, transposed convolutions up, a 1x1 head."""

    def __init__(self) -> None:
        super().__init__()
        self.down1 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect"), nn.BatchNorm2d(8), nn.ReLU())
        self.down2 = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1, groups=4), nn.ReLU(),
                                   nn.Conv2d(16, 16, 3, padding=2, dilation=2, groups=16), nn.ReLU())
        self.up = nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.up2 = nn.ConvTranspose2d(16, 8, 3, stride=1, padding=1, groups=2)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        a = self.down1(x)
        b = self.down2(F.max_pool2d(a, 2))
        u = torch.cat([self.up(b), a], 1)
        return self.head(F.relu(self.up2(u)))


class ConvNd(nn.Module):
    """1-D (dilated, circular, strided) and 3-D convolutions, transposed 1-D and 3-D, unbatched input."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(4, 8, 3, dilation=2, padding=2, padding_mode="circular")
        self.t1 = nn.ConvTranspose1d(8, 4, 4, stride=2, padding=1)
        self.c3 = nn.Conv3d(2, 4, 3, padding=1, groups=2)
        self.t3 = nn.ConvTranspose3d(4, 2, 2, stride=2)

    def forward(self, x1, x3):
        y1 = self.t1(F.gelu(self.c1(x1)))
        y3 = self.t3(F.relu(self.c3(x3)))
        return y1.sum() + y3.sum() + self.c1(x1[0]).sum()


class Seq2Seq(nn.Module):
    """A packed bidirectional GRU encoder, an LSTM decoder with projections, a GRU cell and an LSTM
    cell stepped by hand, dot-product attention over the encoder states by ``bmm``."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.enc = nn.GRU(8, 8, batch_first=True, bidirectional=True, num_layers=2)
        self.dec = nn.LSTM(8, 24, batch_first=True, proj_size=16)
        self.gcell, self.lcell = nn.GRUCell(16, 16), nn.LSTMCell(16, 16)
        self.rnn = nn.RNN(16, 8, nonlinearity="relu")
        self.out = nn.Linear(16, 20)

    def forward(self, src, lengths, tgt):
        packed = nn.utils.rnn.pack_padded_sequence(self.emb(src), lengths, batch_first=True, enforce_sorted=False)
        enc, _ = self.enc(packed)
        enc, _ = nn.utils.rnn.pad_packed_sequence(enc, batch_first=True)
        dec, _ = self.dec(self.emb(tgt))
        att = torch.softmax(torch.bmm(dec, enc.transpose(1, 2)), -1)
        ctx = torch.bmm(att, enc)
        h = self.gcell(ctx[:, 0])
        hc = self.lcell(h)
        for t in range(1, ctx.shape[1]):
            h = self.gcell(ctx[:, t], h)
            hc = self.lcell(h, hc)
        r, _ = self.rnn(ctx)
        return self.out(ctx + hc[0][:, None]).sum() + r.sum()


class Attentions(nn.Module):
    """``nn.Transformer`` with every mask, MHA variants (kdim/vdim, bias_kv, zero_attn, unbatched,
    need_weights off), SDPA with grouped-query heads and a causal mask."""

    def __init__(self) -> None:
        super().__init__()
        self.tr = nn.Transformer(16, 4, 1, 1, 32, dropout=0.0, batch_first=True)
        self.cross = nn.MultiheadAttention(16, 4, kdim=8, vdim=12)
        self.extra = nn.MultiheadAttention(16, 2, add_bias_kv=True, add_zero_attn=True, batch_first=True)

    def forward(self, src, tgt, kv8, kv12):
        pad = torch.zeros(src.shape[:2], dtype=torch.bool)
        pad[1, -2:] = True
        y = self.tr(src, tgt, tgt_mask=nn.Transformer.generate_square_subsequent_mask(tgt.shape[1]),
                    src_key_padding_mask=pad, memory_key_padding_mask=pad, tgt_is_causal=True)
        c, _ = self.cross(y.transpose(0, 1), kv8, kv12, need_weights=False)
        e, w = self.extra(y, y, y, average_attn_weights=False)
        u, _ = self.extra(y[0], y[0], y[0])  # unbatched
        q = y.reshape(2, 5, 4, 4).transpose(1, 2)  # (B, 4 heads, L, 4)
        kv = q[:, :2]  # 2 key/value heads
        s = F.scaled_dot_product_attention(q, kv, kv, is_causal=True, enable_gqa=True)
        return c.sum() + e.sum() + w.sum() + u.sum() + s.sum()


class Functional(nn.Module):
    """Products written as F.* and torch.* calls, positional and by keyword, in place and with ``out=``."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(R(6, 8))
        self.k = nn.Parameter(R(4, 3, 3, 3))
        self.bil = nn.Bilinear(8, 6, 3)

    def forward(self, x, img, a3, b3):
        y = F.linear(x, self.w)                                          # (5, 6)
        y = torch.addmm(y, x, self.w.t(), beta=0.5, alpha=2.0)
        z = torch.baddbmm(a3 @ b3, batch1=a3, batch2=b3, alpha=0.5)       # operands by keyword
        v = torch.addmv(y[:, 0], mat=x, vec=self.w[0]) + torch.mv(x, self.w[1])
        d = torch.dot(x[0], x[1]) + torch.vdot(x[2], x[3]) + torch.inner(x, x).sum()
        t = torch.tensordot(a3, b3, dims=([0, 2], [0, 1]))
        chain = torch.linalg.multi_dot([x[:, :1], self.w[:1, :], x.t()])  # torch's order is not left to right
        cm = torch.chain_matmul(x.t(), x, self.w.t())
        acc = torch.zeros(5, 6)
        acc.addmm_(x, self.w.t())
        r = self.w.t().__rmatmul__(x)
        c = F.conv2d(img, self.k, stride=(1, 2), padding=1)
        ct = F.conv_transpose2d(c, self.k, stride=2)
        ab = torch.addbmm(torch.zeros(3, 5), a3, b3)
        o = torch.outer(x[0], x[1]) + torch.addr(torch.zeros(8, 8), x[2], x[3])
        vd = torch.linalg.vecdot(x, x)
        cs = F.cosine_similarity(x, x.flip(0))
        tbc = torch.conv_tbc(a3, self.w.reshape(2, 4, 6), self.w[0, :6], 1)  # (T, B, C) 1-D convolution
        b = self.bil(x, y)
        return sum(u.sum() for u in (y, z, v, d, t, chain, cm, acc, r, c, ct, ab, o, vd, cs, tbc, b))


class Einsums(nn.Module):
    """einsum-heavy code: attention, three operands, ellipsis broadcast, sublists, private indices,
    a diagonal, an outer product."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(R(8, 8))

    def forward(self, q, k, v):
        s = torch.einsum("bhqd,bhkd->bhqk", q, k).softmax(-1)
        o = torch.einsum("bhqk,bhkd->bhqd", s, v)
        o = torch.einsum("...d,de->...e", o, self.w)
        three = torch.einsum("bhqd,de,bhke->bhqk", q, self.w, k)
        sub = torch.einsum(q, [0, 1, 2, 3], self.w, [3, 4], [0, 1, 2, 4])
        private = torch.einsum("bhqd,bhkd->bq", q, k)
        diag = torch.einsum("ii,ij->j", self.w, self.w)
        outer = torch.einsum("i,j->ij", q[0, 0, 0], k[0, 0, 0])  # K = 1: torch multiplies element-wise
        return o.sum() + three.sum() + sub.sum() + private.sum() + diag.sum() + outer.sum()


class Flex(nn.Module):
    """``flex_attention`` (torch's higher-order operator): a score_mod reading a per-head bias, a
    causal block mask, grouped-query heads (4 query heads, 2 key/value heads), the log-sum-exp.
    FlopCounterMode cannot run torch's eager operator (a TypeError inside it), so its count runs
    the model with the attention replaced by zeros (:meth:`flop_counter_stand_in`) and the
    attention's MACs are a convention (:data:`CONVENTIONS`)."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.kv = nn.Linear(16, 16), nn.Linear(16, 16)
        self.bias = nn.Parameter(R(4))
        self.stand_in = False

    @contextmanager
    def flop_counter_stand_in(self):
        self.stand_in = True
        try:
            yield
        finally:
            self.stand_in = False

    def forward(self, x):
        from torch.nn.attention.flex_attention import AuxRequest, create_block_mask, flex_attention

        b, t, _ = x.shape
        q = self.q(x).reshape(b, t, 4, 4).transpose(1, 2)
        k, v = self.kv(x).reshape(b, t, 2, 2, 4).permute(2, 0, 3, 1, 4)
        if self.stand_in:
            return q.sum() * 0 + k.sum() * 0 + v.sum() * 0
        mask = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, t, t, device="cpu")
        out, aux = flex_attention(q, k, v, score_mod=lambda s, b, h, qi, ki: s + self.bias[h], block_mask=mask,
                                  enable_gqa=True, return_aux=AuxRequest(lse=True))  # (return_lse: deprecated)
        return out.sum() + aux.lse.sum()


class Hooked(nn.Module):
    """A root whose hooks compute: a forward pre-hook projecting its input by a parameter, a forward
    hook (with kwargs) multiplying the output by a buffer. torch runs a root's hooks outside its
    forward (they ran in float32, uncounted, until session 18: ``nn/mode.RootCall``)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 6)
        self.a = nn.Parameter(R(8, 8))
        self.register_buffer("b", R(6, 5))
        self.register_forward_pre_hook(self._pre)
        self.register_forward_hook(self._post, with_kwargs=True)

    def _pre(self, mod, args):
        return (args[0] @ self.a,)

    def _post(self, mod, args, kwargs, out):
        return torch.mm(out, self.b)

    def forward(self, x):
        return torch.relu(self.fc(x))


def _plain(model, *shapes):
    """A factory: the model, and standard normal inputs of these shapes drawn after it."""
    return lambda: (model(), tuple(torch.randn(s) for s in shapes), {})


def _seq2seq_inputs():
    g = torch.Generator().manual_seed(2)
    return torch.randint(0, 20, (3, 6), generator=g), torch.tensor([6, 4, 2]), torch.randint(0, 20, (3, 6), generator=g)


#: name -> factory of (model, args, kwargs)
PLAIN = {
    "unet2d": _plain(UNet2d, (2, 3, 8, 8)),
    "conv-nd": _plain(ConvNd, (2, 4, 10), (1, 2, 4, 4, 4)),
    "seq2seq": lambda: (Seq2Seq(), _seq2seq_inputs(), {}),
    "attentions": _plain(Attentions, (2, 5, 16), (2, 5, 16), (6, 2, 8), (6, 2, 12)),
    "functional": _plain(Functional, (5, 8), (2, 3, 6, 6), (2, 3, 4), (2, 4, 5)),
    "einsums": _plain(Einsums, (2, 2, 4, 8), (2, 2, 5, 8), (2, 2, 5, 8)),
    "flex-attention": _plain(Flex, (2, 6, 16)),
    "root-hooks": _plain(Hooked, (3, 8)),
}

#: MACs the device counts that FlopCounterMode does not, by model, with the reason: torch computes
#: these products with an element-wise ``mul`` (no aten product), the device as K = 1 products or,
#: for ``bilinear``, as its two products (torch's ``_trilinear``, which FlopCounterMode does not count)
CONVENTIONS = {
    "functional": {
        "outer and addr of two 8-vectors: 64 K = 1 products each": 2 * 8 * 8,
        "linalg.vecdot of 5 rows of 8: a mul and a sum in torch": 5 * 8,
        "cosine_similarity of 5 rows of 8: a mul and a sum in torch": 5 * 8,
        "conv_tbc, (3 x 3 x 6) outputs of 2 x 4 (FlopCounterMode has no formula for it)": 3 * 3 * 6 * 2 * 4,
        "nn.Bilinear(8, 6, 3) on 5 rows: 5 x 3 x 6 x (8 + 1)": 5 * 3 * 6 * (8 + 1),
    },
    "einsums": {"einsum('i,j->ij') of two 8-vectors: 64 K = 1 products": 8 * 8},
    "flex-attention": {"flex_attention's QK^T and PV, which FlopCounterMode cannot run (see Flex): 2 sequences x "
                       "4 query heads x 6 queries x 6 keys x (4 + 4)": 2 * 4 * 6 * 6 * (4 + 4)},
    "longformer": {"each layer's sliding-window mask, einsum('bcxd,bcyd->bcxy', ones, mask) over a head dim of 1: "
                   "2 layers x 2 sequences x 3 chunks x 4 x 4 K = 1 products": 2 * 2 * 3 * 4 * 4},
}


def _hf():
    """A subset of tests/reach's Hugging Face models: what each brings to the count."""
    import test_hf_models as hf

    names = ["gpt2",        # Conv1D: addmm with the weight as mat2
             "llama",       # SDPA with grouped-query heads, rotary
             "bloom",       # ALiBi: Tensor.baddbmm(batch1=..., batch2=...) by keyword
             "t5",          # encoder-decoder, relative position bias
             "longformer",  # einsum attention, K = 1 einsum masks
             "xlnet",       # einsum attention with relative positions
             "whisper",     # conv1d front end, encoder-decoder
             "wav2vec2",    # strided conv1d feature extractor, weight-normed grouped positional conv1d
             "clip",        # dual encoder
             "convnext",    # 7x7 depthwise convolutions
             "swin",        # windowed attention
             "resnet",      # convolutions, batch norm
             "mamba",       # depthwise causal conv1d, selective scan in torch ops
             "encodec"]     # conv1d, LSTM, transposed conv1d
    return {n: (lambda n=n: hf.build(n)) for n in names}, hf.output


def _sentence_transformer():
    """A sentence-transformers pipeline (tiny BERT, mean pooling, a dense layer, normalisation) built
    offline: a 20-word vocabulary and random weights saved to a temporary folder and loaded back."""
    import tempfile

    import transformers as T
    from sentence_transformers import SentenceTransformer

    try:
        from sentence_transformers.sentence_transformer import modules as models
    except ImportError:  # sentence-transformers before 6
        from sentence_transformers import models

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + "the a cat dog sat on mat ran far away quick brown fox".split()
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "vocab.txt"), "w") as f:
            f.write("\n".join(words) + "\n")
        T.BertTokenizerFast(vocab_file=os.path.join(d, "vocab.txt")).save_pretrained(d)
        T.BertModel(T.BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=64, max_position_embeddings=32)).save_pretrained(d)
        st = SentenceTransformer(modules=[models.Transformer(d, max_seq_length=16), models.Pooling(32, "mean"),
                                          models.Dense(32, 16), models.Normalize()], device="cpu")
    encode = getattr(st, "preprocess", None) or st.tokenize  # tokenize: before sentence-transformers 6
    features = encode(["the cat sat on the mat", "a quick brown fox ran far away", "the dog sat"])
    return st, (features,), {}


def _catalog():
    out = {n: (f, None) for n, f in PLAIN.items()}
    try:
        hf_models, hf_output = _hf()
    except Exception:  # transformers missing: the plain catalog alone
        return out
    out.update({n: (f, hf_output) for n, f in hf_models.items()})
    try:
        import sentence_transformers  # noqa: F401
    except ImportError:
        return out
    out["sentence-transformers"] = (_sentence_transformer, lambda o: o["sentence_embedding"])
    return out


CATALOG = _catalog()


def _main(o, pick) -> torch.Tensor:
    if pick is not None and not isinstance(o, torch.Tensor):
        return pick(o)
    return o if isinstance(o, torch.Tensor) else o[0]


def _build(name):
    torch.manual_seed(0)
    factory, pick = CATALOG[name]
    model, args, kwargs = factory()
    return model.eval(), args, kwargs, pick


def _convert(model, cfg=DEFAULT, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DigitalProductWarning)
        cm = abfp.convert(model, cfg, **kw)
    return cm, caught


@pytest.mark.parametrize("name", sorted(CATALOG))
def test_every_product_is_counted_once_on_the_device(name):
    model, args, kwargs, pick = _build(name)
    want = independent_macs(model, args, kwargs) + sum(CONVENTIONS.get(name, {}).values())
    with torch.no_grad():
        ref = _main(model(*args, **kwargs), pick)

    cm, _ = _convert(model)
    spy = FloatProducts()
    with warnings.catch_warnings(record=True) as caught, torch.no_grad(), spy:
        warnings.simplefilter("always", DigitalProductWarning)
        out = _main(cm(*args, **kwargs), pick)
    cov = abfp.coverage(cm)
    assert not [w for w in caught if issubclass(w.category, DigitalProductWarning)]
    assert cov.digital_macs == 0 and cov.digital_ops == {}, cov
    assert cov.analog_macs == want, (cov.analog_macs, want, cov.analog_macs - want)
    assert spy.seen == {}, f"float32 products during the converted forward: {spy.seen}"
    rel = float((out.double() - ref.double()).norm() / ref.double().norm())
    assert 1e-4 < rel < 1.0, rel  # the device is no float32, nor noise

    # every module excluded: the same products, counted as digital, and seen in float32 by the spy
    xm, _ = _convert(model, exclude=[".*"])
    spy = FloatProducts()
    with torch.no_grad(), spy:
        xout = _main(xm(*args, **kwargs), pick)
    xc = abfp.coverage(xm)
    assert xc.analog_macs == 0 and xc.digital_macs == cov.analog_macs, (xc.digital_macs, cov.analog_macs, xc.digital_ops)
    assert spy.seen, "the spy saw no float32 product of the excluded model"
    torch.testing.assert_close(xout, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(CATALOG))
def test_every_product_equals_the_reference_kernel_on_its_operands(name):
    """Each product of the model, on the operands it met in the model, by the fast kernel and by
    the float64 reference of SPEC (noise-free device): equal within float32 rounding, but for the
    outputs whose inputs hold a value within float32 rounding of a DAC code's half-way point.

    The fast path computes ``x / s * L`` in float32, the reference in float64: an input at
    22.500000710 (in float64) becomes 22.5 in float32 and rounds to the even code 22, not 23. The
    inputs of a product are often outputs of the device (ADC codes times scales: a lattice), so
    such near-ties are common in chained products (MHA's ``QK^T`` after its projections, with
    ``bias_k``: one output of 140 off by one ADC code); each moves one output by about one code."""
    model, args, kwargs, _ = _build(name)
    cfg = DEFAULT.replace(noise_std=0.0)
    ref_cfg = cfg.replace(execution=abfp.ExecutionOptions(kernel="reference"))
    cm, _ = _convert(model, cfg)
    report: list[tuple[float, int, int, str]] = []

    def both(call):
        y = call.analog()
        y_ref = call.analog(ref_cfg).to(y.dtype)
        if y.numel():
            off = (y - y_ref).abs() > 1e-5 * float(y_ref.abs().max()) + 1e-30
            report.append((float(off.float().mean()), int(off.sum()), y.numel(), call.site))
        return y

    analog_state(cm).interceptors["*"] = both
    with torch.no_grad():
        cm(*args, **kwargs)
    assert report
    bad = [r for r in report if r[1] > max(1, 0.01 * r[2])]
    assert not bad, bad


@pytest.mark.parametrize("name", ["seq2seq", "attentions", "functional", "einsums", "flex-attention"])
def test_the_count_holds_in_training_under_autocast_and_through_functional_call(name):
    """The same MACs in train mode (dropout active), under bfloat16 autocast, through
    ``torch.func.functional_call``, and on a device with 8-wide tiles, concatenated recurrent gates
    and 3 repeats (each product still counted once: repeats are energy, not MACs)."""
    model, args, kwargs, _ = _build(name)
    want = independent_macs(model, args, kwargs) + sum(CONVENTIONS.get(name, {}).values())
    runs = {
        "train": (DEFAULT, lambda m: m.train()(*args, **kwargs)),
        "autocast": (DEFAULT, lambda m: _autocast(m, args, kwargs)),
        "functional_call": (DEFAULT, lambda m: torch.func.functional_call(m, dict(m.named_parameters()), args, kwargs)),
        "n8-concat-repeats": (DEFAULT.replace(tile_width=8, recurrent_concat=True, repeats=3), lambda m: m(*args, **kwargs)),
    }
    for label, (cfg, call) in runs.items():
        cm, _ = _convert(model, cfg)
        with torch.no_grad():
            call(cm)
        cov = abfp.coverage(cm)
        assert (cov.analog_macs, cov.digital_macs) == (want, 0), (label, cov)


def _autocast(m, args, kwargs):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return m(*args, **kwargs)


def test_the_spy_sees_a_float32_product():
    """The spy itself: a float32 matmul is seen, DAC codes (integer-valued floats) are not."""
    spy = FloatProducts()
    with spy:
        torch.randn(3, 4) @ torch.randn(4, 5)
        torch.randint(-127, 128, (3, 4)).float() @ torch.randint(-127, 128, (4, 5)).float()
    assert spy.seen == {"mm": 1}


if __name__ == "__main__":  # the table of docs/families.md ("MAC audit")
    torch.set_num_threads(1)
    print("| model | MACs (FlopCounterMode) | conventions | device MACs | excluded: digital MACs |")
    print("|---|---:|---:|---:|---:|")
    for n in sorted(CATALOG):
        m, a, kw, _ = _build(n)
        base = independent_macs(m, a, kw)
        extra = sum(CONVENTIONS.get(n, {}).values())
        c, _ = _convert(m)
        x, _ = _convert(m, exclude=[".*"])
        with torch.no_grad():
            c(*a, **kw)
            x(*a, **kw)
        print(f"| {n} | {base:,} | {extra:,} | {abfp.coverage(c).analog_macs:,} | {abfp.coverage(x).digital_macs:,} |")
