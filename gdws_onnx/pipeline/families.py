"""The conv factorization families `conv="auto"` chooses among, behind one interface.

A family turns one conv into candidate `Form`s at given relative weight errors
||W - W'||_F^2 / ||W||_F^2 (the one accuracy currency every family shares: both families below
are Eckart-Young truncations, so the error of a form is the energy of what it drops), and
realizes a form as ONNX nodes. Each family's math lives in core/ (numpy), its realization in
graph/; this module only adapts them to the interface and registers them in FAMILIES.

A new family is one math module, one realization module, one class here and one FAMILIES entry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import onnx

from gdws_onnx.core import allocate, decompose
from gdws_onnx.core import spatial_svd as ssvd_math
from gdws_onnx.core import tucker as tucker_math
from gdws_onnx.graph.convs import ConvSite
from gdws_onnx.graph.rewrite import LayerRewrite, Names, gdws_subgraph
from gdws_onnx.graph.spatial_svd import geometry, ssvd_skip_reason, ssvd_subgraph
from gdws_onnx.graph.tucker import tucker_skip_reason, tucker_subgraph
from gdws_onnx.pipeline.latency import form_factors, realizations

SSVD_REALIZATION = "kx1+1xk"  # the spatial SVD's only realization: a k_h x 1 conv, then a 1 x k_w conv
TUCKER_REALIZATION = "1x1+k+1x1"  # Tucker-2's: 1x1 conv C -> r1, the k conv r1 -> r2, 1x1 conv r2 -> M


@dataclass(frozen=True)
class Form:
    """One candidate factorization of one conv: family, total rank, realization, error, MACs."""

    family: str  # a FAMILIES key
    rank: int  # total rank: GDWS width G = sum_c g_c, spatial SVD rank r, Tucker-2 r1 + r2
    realization: str  # GDWS: one of latency.FORMS; spatial SVD: SSVD_REALIZATION
    error: float  # relative weight error ||W - W'||^2 / ||W||^2
    macs: int  # MACs per sample of the realization
    params: int  # weights of the realization (the conv's bias not counted)
    ranks: tuple[int, ...] = field(default=(), compare=False)  # GDWS: terms per input channel; Tucker-2: (r1, r2)

    @property
    def key(self) -> tuple:
        """What identifies the form's latency at a given geometry (the layer cache's option)."""
        return (self.family, self.rank, self.realization) + ((self.ranks,) if self.family == "tucker" else ())


class Family(Protocol):
    """What the auto planner needs of a factorization family."""

    name: str

    def skip_reason(self, site: ConvSite) -> str | None:
        """Why this family cannot realize the conv (None: it can)."""
        ...

    def max_rank(self, site: ConvSite) -> int:
        """The rank at which the family is exact."""
        ...

    def forms(self, site: ConvSite, errors: list[float], cheaper_only: bool = True) -> list[Form]:
        """Its forms at the lowest ranks within each relative weight error (with `cheaper_only`,
        those with fewer MACs than the conv); at error 0 the exact ones."""
        ...

    def subgraph(self, site: ConvSite, form: Form, names: Names) -> tuple[list[onnx.TensorProto], list[onnx.NodeProto]]:
        """The nodes and weights that replace the conv (a `graph.rewrite.SubgraphBuilder` result)."""
        ...


def dense_macs(site: ConvSite) -> int:
    """MACs per sample of the conv as it is (its output size must be known)."""
    return int(site.pixels) * site.macs_per_pixel


class SpectrumCache:
    """A family's decomposition of each conv, computed once per conv name by `compute(weight)`."""

    def __init__(self, compute: Callable[[ConvSite], Any]):
        self.compute = compute
        self.by_name: dict[str, Any] = {}

    def __call__(self, site: ConvSite) -> Any:
        if site.name not in self.by_name:
            self.by_name[site.name] = self.compute(site)
        return self.by_name[site.name]


class GDWSFamily:
    """Generalized depthwise-separable: per input channel, the top g_c singular terms of its
    (M x k) kernel matrix (`core.decompose`, `core.allocate.relative_lego`), in each realization
    `latency.realizations` measures (Gather + depthwise at its width and rounded to 8/16,
    channel multiplier, stacked depthwise)."""

    name = "gdws"

    def __init__(self):
        self.spectrum = SpectrumCache(lambda site: decompose.spectrum(site.weight, site.group))

    def skip_reason(self, site: ConvSite) -> str | None:
        if site.weight is None:
            return site.weight_source
        if site.kernel_size == 1:
            return "1x1 conv (already pointwise)"
        return None

    def max_rank(self, site: ConvSite) -> int:
        return int(self.spectrum(site).s.size)

    def forms(self, site: ConvSite, errors: list[float], cheaper_only: bool = True) -> list[Form]:
        spec = self.spectrum(site)
        sc = decompose.scores(spec)
        energy = decompose.weighted_energy(spec)
        out, seen = [], set()
        for e in errors:
            ranks, _ = allocate.relative_lego(sc, e, site.weight.dtype)
            choices = realizations(spec, sc, ranks) if cheaper_only else [(ranks, "gather")]
            for r, form in choices:
                cost = (decompose.gdws_cost_per_pixel(spec, r) if form == "gather"
                        else decompose.multiplier_cost_per_pixel(spec, r))
                f = Form(self.name, int(r.sum()), form, decompose.weighted_error(spec, r) / energy if energy else 0.0,
                         int(site.pixels) * int(cost), int(cost), tuple(int(x) for x in r))
                if f.key not in seen:
                    seen.add(f.key)
                    out.append(f)
        return out

    def subgraph(self, site: ConvSite, form: Form, names: Names) -> tuple[list[onnx.TensorProto], list[onnx.NodeProto]]:
        f = form_factors(self.spectrum(site), np.asarray(form.ranks), site.weight.dtype, form.realization)
        return gdws_subgraph(LayerRewrite(site, f), names)


class SpatialSVDFamily:
    """Spatial SVD: the rank-r truncated SVD of the (I k_h) x (O k_w) matrix of the weight
    (`core.spatial_svd`), realized as a k_h x 1 conv to r channels, then a 1 x k_w conv
    (`graph.spatial_svd`)."""

    name = "ssvd"

    def __init__(self):
        self.spectrum = SpectrumCache(lambda site: ssvd_math.spatial_spectrum(site.weight))

    def skip_reason(self, site: ConvSite) -> str | None:
        reason = ssvd_skip_reason(site)
        if reason:
            return reason
        geo = geometry(site)
        if site.out_spatial is not None and (geo.out_h, geo.out_w) != tuple(site.out_spatial):
            return f"inferred output size {site.out_spatial} disagrees with its attributes"
        return None

    def max_rank(self, site: ConvSite) -> int:
        return self.spectrum(site).max_rank

    def forms(self, site: ConvSite, errors: list[float], cheaper_only: bool = True) -> list[Form]:
        spec = self.spectrum(site)
        per_rank = ssvd_math.ssvd_macs_per_rank(spec.weight_shape, geometry(site))
        dense = dense_macs(site)
        out, seen = [], set()
        for e in errors:
            r = ssvd_math.rank_at_error(spec.s, e)
            if r not in seen and (r * per_rank < dense or not cheaper_only):
                seen.add(r)
                o, i, kh, kw = spec.weight_shape
                out.append(Form(self.name, r, SSVD_REALIZATION, ssvd_math.relative_error(spec, r), r * per_rank,
                                r * (i * kh + o * kw)))
        return out

    def subgraph(self, site: ConvSite, form: Form, names: Names) -> tuple[list[onnx.TensorProto], list[onnx.NodeProto]]:
        a, b = ssvd_math.spatial_factors(self.spectrum(site), form.rank, site.weight.dtype)
        return ssvd_subgraph(site, a, b, geometry(site), names)


class Tucker2Family:
    """Tucker-2: HOSVD of the weight over its channel modes (`core.tucker`), realized as a 1x1
    conv to r1 channels, the conv's kernel r1 -> r2, and a 1x1 conv to M (`graph.tucker`); the
    cheapest (r1, r2) pair by MACs within each error."""

    name = "tucker"

    def __init__(self):
        self.spectrum = SpectrumCache(lambda site: tucker_math.tucker_spectrum(site.weight))

    def skip_reason(self, site: ConvSite) -> str | None:
        return tucker_skip_reason(site)

    def max_rank(self, site: ConvSite) -> int:
        return sum(self.spectrum(site).max_ranks)

    def forms(self, site: ConvSite, errors: list[float], cheaper_only: bool = True) -> list[Form]:
        spec = self.spectrum(site)
        in_pixels = int(np.prod(site.in_spatial, dtype=np.int64))
        dense = dense_macs(site)
        out, seen = [], set()
        for e in errors:
            r1, r2 = spec.max_ranks if e <= 0 and not cheaper_only else \
                tucker_math.ranks_at_error(spec, e, in_pixels, int(site.pixels))
            macs = tucker_math.tucker_macs(spec.weight_shape, r1, r2, in_pixels, int(site.pixels))
            if (r1, r2) not in seen and (macs < dense or not cheaper_only):
                seen.add((r1, r2))
                m, c, *k = spec.weight_shape
                out.append(Form(self.name, r1 + r2, TUCKER_REALIZATION, tucker_math.relative_error(spec, r1, r2), macs,
                                c * r1 + r1 * r2 * int(np.prod(k)) + r2 * m, (r1, r2)))
        return out

    def subgraph(self, site: ConvSite, form: Form, names: Names) -> tuple[list[onnx.TensorProto], list[onnx.NodeProto]]:
        first, core, last = tucker_math.tucker_factors(self.spectrum(site), *form.ranks, site.weight.dtype)
        return tucker_subgraph(site, first, core, last, names)


FAMILIES: dict[str, type] = {"gdws": GDWSFamily, "ssvd": SpatialSVDFamily, "tucker": Tucker2Family}  # conv="auto" chooses among these


def families(names: tuple[str, ...] | None = None) -> dict[str, Family]:
    """Fresh instances of the named families (all of FAMILIES when None), in FAMILIES order."""
    return {k: cls() for k, cls in FAMILIES.items() if names is None or k in names}
