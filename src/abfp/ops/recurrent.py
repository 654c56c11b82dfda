"""Recurrent layers on the device: ``torch.lstm``, ``torch.gru``, ``torch.rnn_tanh``,
``torch.rnn_relu`` (padded and packed overloads) and their cells (SPEC.md section 3.1).

Per time step, every matrix product is an ABFP product (SPEC section 1), tiled along its
own reduction axis; biases, gate nonlinearities and the cell update are digital, float32:

* LSTM: ``g = x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh``, ``i, f, c~, o = s(g_i), s(g_f),
  tanh(g_g), s(g_o)``, ``c_t = f c_{t-1} + i c~``, ``h_t = o tanh(c_t)``, and with
  ``proj_size > 0`` ``h_t = (o tanh(c_t)) W_hr^T`` (a third product).
* GRU: ``r, z = s(x W_ir^T + b_ir + h W_hr^T + b_hr), s(...)``, ``n = tanh(x W_in^T + b_in
  + r (h W_hn^T + b_hn))``, ``h_t = (1 - z) n + z h_{t-1}``.
* RNN: ``h_t = tanh|relu(x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh)``.

The input products of all time steps are one batched product (scales are per row, so the
numbers are those of one product per step). With ``ABFPConfig.recurrent_concat`` the gates
come from one product per step over ``[x_t, h_{t-1}]`` against ``[W_ih W_hh]`` (GRU: the
reset and update gates only; see the field's docstring).

Every product goes through :func:`abfp.ops.site.run_product` as a ``"linear"`` product
(``F.linear(x, W)`` is its float32 twin), at a site named after the weight it uses and
aggregated over time steps: ``"<module>:ih_l0"``, ``"<module>:hh_l0_reverse"``,
``"<module>:hr_l1"``, ``"<module>:cat_l0"``; cells drop the layer suffix (``"<cell>:hh"``).
A second recurrent call with other weights inside the same module call gets a prefix
(``"<module>:lstm1.ih_l0"``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import functional as AF
from .coverage import register_macs
from .registry import register

_GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}


# ----------------------------------------------------------------------------- products
class _Products:
    """The analog products of one recurrent call: each through ``run_product`` at its site."""

    def __init__(self, frame: Any, prefix: str) -> None:
        from ..nn.mode import run_product  # abfp.nn.mode imports abfp.ops: import late

        self._run = run_product
        self.frame = frame
        self.prefix = prefix
        self.concat = bool(getattr(frame.state.config_for(frame.name), "recurrent_concat", False))

    def __call__(self, site: str, x: Tensor, w: Tensor) -> Tensor:
        """``x W^T`` on the device (no bias), float32; ``x``: (M, K), ``w``: (N, K)."""
        if x.shape[0] == 0:
            return x.new_zeros((0, w.shape[0]), dtype=torch.float32)
        k = int(w.shape[1])

        def analog(c, s, stats, g):
            return AF.linear(x, w, None, config=c, input_scale=s[0], generator=g, stats=stats)

        y = self._run(self.frame, "linear", F.linear, (x, w), {}, analog, (x, w), k,
                      lambda y: x.shape[0] * w.shape[0] * k, site=self.prefix + site)
        return y.float()


def _prefix(frame: Any, kind: str, key: Tensor) -> str:
    """``"<module>:"`` for the first set of recurrent weights a module call uses, then
    ``"<module>:<kind><i>."``: sites stay stable when a module calls the same cell in a loop."""
    tag = f"\0{kind}@{id(key)}"
    i = frame.counts.get(tag)
    if i is None:
        i = frame.counts.get("\0" + kind, 0)
        frame.counts["\0" + kind] = i + 1
        frame.counts[tag] = i
    return f"{frame.name}:" + ("" if i == 0 else f"{kind}{i}.")


@dataclass
class _Weights:
    """One layer and direction: ``w_ih`` (G*H, I), ``w_hh`` (G*H, P), biases (G*H,), ``w_hr`` (P, H)."""

    w_ih: Tensor
    w_hh: Tensor
    b_ih: Tensor | None = None
    b_hh: Tensor | None = None
    w_hr: Tensor | None = None
    _cat: Tensor | None = None

    def cat(self, rows: int | None = None) -> Tensor:
        """``[W_ih W_hh]`` (its first ``rows`` rows), built once per call: one cached encoding."""
        if self._cat is None:
            r = self.w_ih.shape[0] if rows is None else rows
            self._cat = torch.cat([self.w_ih[:r], self.w_hh[:r]], dim=1)
        return self._cat


def _add(y: Tensor, *bs: Tensor | None) -> Tensor:
    for b in bs:
        if b is not None:
            y = y + b.float()
    return y


# ----------------------------------------------------------------------------- one step
class _Cell:
    """The per-step arithmetic of one layer and direction of family ``kind``."""

    def __init__(self, kind: str, w: _Weights, products: _Products, suffix: str) -> None:
        self.kind, self.w, self.p, self.suffix = kind, w, products, suffix
        self.hidden = w.w_hh.shape[0] // _GATES[kind]

    def input_products(self, x: Tensor) -> Tensor | None:
        """The input products of all steps at once ((R, I) -> (R, G*H) with ``b_ih``), or None
        when the concatenated form computes them step by step (GRU: the candidate rows only)."""
        w, H = self.w, self.hidden
        if not self.p.concat:
            # both biases join the input products once for all steps (GRU: not b_hn, which r scales)
            b = None if w.b_ih is None else w.b_ih.float() + _hh_bias(self.kind, w.b_hh, H)
            return _add(self.p("ih" + self.suffix, x, w.w_ih), b)
        if self.kind == "gru":
            return _add(self.p("ih" + self.suffix, x, w.w_ih[2 * H:]), _rows(w.b_ih, 2 * H, 3 * H))
        return None

    def step(self, gi: Tensor | None, x_t: Tensor, h: Tensor, c: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """One step for the rows of ``h`` (and ``c``): ``gi`` the input products of this step
        (None: concatenated form), ``x_t`` the step's input rows."""
        w, p, sfx, H = self.w, self.p, self.suffix, self.hidden
        if self.kind == "gru":
            if p.concat:
                rz = _add(p("cat" + sfx, torch.cat([x_t, h], 1), w.cat(2 * H)), _rows(w.b_ih, 0, 2 * H),
                          _rows(w.b_hh, 0, 2 * H))
                hn = _add(p("hh" + sfx, h, w.w_hh[2 * H:]), _rows(w.b_hh, 2 * H, 3 * H))
                r, z = torch.sigmoid(rz).chunk(2, 1)
                assert gi is not None
                n = torch.tanh(gi + r * hn)
            else:
                assert gi is not None
                gh = p("hh" + sfx, h, w.w_hh)
                rz = torch.sigmoid(gi[:, :2 * H] + gh[:, :2 * H])  # b_ih, b_hr, b_hz are in gi
                r, z = rz[:, :H], rz[:, H:]
                n = torch.tanh(gi[:, 2 * H:] + r * _add(gh[:, 2 * H:], _rows(w.b_hh, 2 * H, 3 * H)))
            return torch.lerp(n, h.float(), z), None  # (1 - z) n + z h
        if p.concat:
            g = _add(p("cat" + sfx, torch.cat([x_t, h], 1), w.cat()), w.b_ih, w.b_hh)
        else:
            assert gi is not None
            g = p("hh" + sfx, h, w.w_hh) + gi  # both biases are in gi
        if self.kind == "rnn_tanh":
            return torch.tanh(g), None
        if self.kind == "rnn_relu":
            return torch.relu(g), None
        assert c is not None
        s_if = torch.sigmoid(g[:, :2 * H])  # gates in torch's order: input, forget, cell, output
        c_new = torch.addcmul(s_if[:, H:] * c.float(), s_if[:, :H], torch.tanh(g[:, 2 * H:3 * H]))
        h_new = torch.sigmoid(g[:, 3 * H:]) * torch.tanh(c_new)
        if w.w_hr is not None:
            h_new = p("hr" + sfx, h_new, w.w_hr)
        return h_new, c_new


def _rows(b: Tensor | None, lo: int, hi: int) -> Tensor | None:
    return None if b is None else b[lo:hi]


def _hh_bias(kind: str, b_hh: Tensor | None, H: int) -> Tensor | float:
    """The part of ``b_hh`` that adds to the gates directly (GRU: all but ``b_hn``)."""
    if b_hh is None:
        return 0.0
    if kind == "gru":
        return torch.cat([b_hh[:2 * H].float(), b_hh.new_zeros(H, dtype=torch.float32)])
    return b_hh.float()


# ----------------------------------------------------------------------------- sequences
def _direction(cell: _Cell, data: Tensor, sizes: Sequence[int], reverse: bool, h0: Tensor,
               c0: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
    """One layer, one direction over a time-major packed sequence ``data`` (sum(sizes), I):
    step t holds rows ``[off_t, off_t + sizes[t])``, the first ``sizes[t]`` sequences of the
    batch (sizes non-increasing). Rows beyond ``sizes[t]`` keep their state. Returns the
    outputs (sum(sizes), H_out) in time order and the final ``h``, ``c``."""
    offs = [0]
    for s in sizes:
        offs.append(offs[-1] + s)
    gi_all = cell.input_products(data)
    h, c = h0.float(), None if c0 is None else c0.float()
    outs: list[Tensor | None] = [None] * len(sizes)
    order = range(len(sizes) - 1, -1, -1) if reverse else range(len(sizes))
    for t in order:
        b, lo = sizes[t], offs[t]
        gi = None if gi_all is None else gi_all[lo:lo + b]
        hb, cb = cell.step(gi, data[lo:lo + b], h[:b], None if c is None else c[:b])
        outs[t] = hb
        h = hb if b == h.shape[0] else torch.cat([hb, h[b:]])
        if c is not None and cb is not None:
            c = cb if b == c.shape[0] else torch.cat([cb, c[b:]])
    if not outs:
        return data.new_zeros((0, h.shape[1]), dtype=torch.float32), h, c
    return torch.cat(outs, 0), h, c  # type: ignore[arg-type]


def _split_params(params: Sequence[Tensor], has_biases: bool, num_layers: int, dirs: int) -> list[_Weights]:
    per = len(params) // (num_layers * dirs)
    if per * num_layers * dirs != len(params) or per not in (2 + 2 * has_biases, 3 + 2 * has_biases):
        raise ValueError(f"recurrent layer: {len(params)} weight tensors do not fit {num_layers} layer(s), "
                         f"{dirs} direction(s), bias={has_biases}")
    out = []
    for i in range(num_layers * dirs):
        p = list(params[i * per:(i + 1) * per])
        w = _Weights(p[0], p[1])
        if has_biases:
            w.b_ih, w.b_hh = p[2], p[3]
        if len(p) == 3 + 2 * has_biases:
            w.w_hr = p[-1]
        out.append(w)
    return out


def _sequence(kind: str, frame: Any, data: Tensor, sizes: Sequence[int], hx: Tensor | tuple[Tensor, Tensor],
              params: Sequence[Tensor], has_biases: bool, num_layers: int, dropout: float, train: bool,
              bidirectional: bool) -> tuple[Tensor, list[Tensor]]:
    """A whole stack over a time-major packed sequence; returns (output data, [h_n(, c_n)])."""
    dirs = 2 if bidirectional else 1
    ws = _split_params(params, has_biases, num_layers, dirs)
    products = _Products(frame, _prefix(frame, kind, ws[0].w_ih))
    h0, c0 = (hx[0], hx[1]) if kind == "lstm" else (hx, None)
    out_dtype = data.dtype
    x = data
    hn, cn = [], []
    for layer in range(num_layers):
        outs = []
        for d in range(dirs):
            i = layer * dirs + d
            cell = _Cell(kind, ws[i], products, f"_l{layer}" + ("_reverse" if d else ""))
            y, h, c = _direction(cell, x, sizes, d == 1, h0[i], None if c0 is None else c0[i])
            outs.append(y)
            hn.append(h)
            if c is not None:
                cn.append(c)
        x = outs[0] if dirs == 1 else torch.cat(outs, 1)
        if dropout > 0 and train and layer < num_layers - 1:
            x = F.dropout(x, dropout, training=True)
    states = [torch.stack(hn).to(out_dtype)]
    if kind == "lstm":
        states.append(torch.stack(cn).to(out_dtype))
    return x.to(out_dtype), states


def _is_packed(args: tuple, kwargs: dict) -> bool:
    """Packed overload: ``(data, batch_sizes, hx, params, ...)``; padded: ``(input, hx, params, ...)``."""
    if "batch_sizes" in kwargs:
        return True
    return len(args) > 1 and isinstance(args[1], Tensor) and not args[1].is_floating_point()


def _padded_args(input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first):
    return input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first


def _packed_args(data, batch_sizes, hx, params, has_biases, num_layers, dropout, train, bidirectional):
    return data, batch_sizes, hx, params, has_biases, num_layers, dropout, train, bidirectional


def _sequence_handler(kind: str) -> Callable:
    def handler(frame: Any, func: Callable, args: tuple, kwargs: dict) -> Any:
        if _is_packed(args, kwargs):
            data, batch_sizes, hx, params, bias, layers, p, train, bidir = _packed_args(*args, **kwargs)
            sizes = [int(s) for s in batch_sizes.tolist()]
            y, states = _sequence(kind, frame, data, sizes, hx, params, bool(bias), int(layers), float(p),
                                  bool(train), bool(bidir))
            return (y, *states)
        x, hx, params, bias, layers, p, train, bidir, batch_first = _padded_args(*args, **kwargs)
        if x.dim() != 3:
            raise ValueError(f"torch.{kind}: input must be 3-D (a batch of sequences), got shape {tuple(x.shape)}")
        if batch_first:
            x = x.transpose(0, 1)
        T, B = x.shape[0], x.shape[1]
        y, states = _sequence(kind, frame, x.reshape(T * B, x.shape[2]), [B] * T, hx, params, bool(bias),
                              int(layers), float(p), bool(train), bool(bidir))
        y = y.reshape(T, B, y.shape[-1])
        if batch_first:
            y = y.transpose(0, 1)
        return (y, *states)

    handler.__name__ = f"_{kind}"
    return handler


def _sequence_macs(args: tuple, kwargs: dict, out: Any) -> int:
    """MACs of one recurrent call (padded or packed), as the device computes it: every row of every
    step meets every weight matrix of its layer and direction once (``ih``, ``hh``, ``hr``), in the
    separate and the concatenated (``cat``) forms alike."""
    if _is_packed(args, kwargs):
        data, _, _, params, *_ = _packed_args(*args, **kwargs)
        rows = data.shape[0]
    else:
        x, _, params, *_ = _padded_args(*args, **kwargs)
        rows = math.prod(x.shape[:-1])
    return rows * sum(p.numel() for p in params if p.dim() == 2)


for _kind in _GATES:
    register(getattr(torch, _kind))(_sequence_handler(_kind))
    register_macs(getattr(torch, _kind))(_sequence_macs)


# ----------------------------------------------------------------------------- cells
def _cell_args(input, hx, w_ih, w_hh, b_ih=None, b_hh=None):
    return input, hx, w_ih, w_hh, b_ih, b_hh


def _cell_handler(kind: str) -> Callable:
    def handler(frame: Any, func: Callable, args: tuple, kwargs: dict) -> Any:
        x, hx, w_ih, w_hh, b_ih, b_hh = _cell_args(*args, **kwargs)
        lstm = kind == "lstm"
        h, c = (hx[0], hx[1]) if lstm else (hx, None)
        single = x.dim() == 1
        if single:
            x, h = x.unsqueeze(0), h.unsqueeze(0)
            c = None if c is None else c.unsqueeze(0)
        cell = _Cell(kind, _Weights(w_ih, w_hh, b_ih, b_hh), _Products(frame, _prefix(frame, kind + "_cell", w_ih)), "")
        gi = cell.input_products(x)
        h_new, c_new = cell.step(gi, x, h, c)
        out = [h_new.to(x.dtype)] + ([c_new.to(x.dtype)] if lstm and c_new is not None else [])
        if single:
            out = [t.squeeze(0) for t in out]
        return tuple(out) if lstm else out[0]

    handler.__name__ = f"_{kind}_cell"
    return handler


def _cell_macs(args: tuple, kwargs: dict, out: Any) -> int:
    """MACs of one cell call: each input row meets ``W_ih`` and ``W_hh`` once."""
    x, _, w_ih, w_hh, _, _ = _cell_args(*args, **kwargs)
    return math.prod(x.shape[:-1]) * (w_ih.numel() + w_hh.numel())


for _kind in _GATES:
    register(getattr(torch, _kind + "_cell"))(_cell_handler(_kind))
    register_macs(getattr(torch, _kind + "_cell"))(_cell_macs)
