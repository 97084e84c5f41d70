"""Post-hoc Laplace approximation of one linear classification head (methods.md §2.3, §2.10).

The head maps features ``phi [N, D]`` to logits ``f = phi W^T + b (+ offset)``; its weights
``theta = [vec(W) row-major, b]`` get a Gaussian prior ``N(0, 1/delta I)`` and the posterior is
``N(theta_MAP, (H + delta I)^{-1})`` with ``H`` the generalised Gauss-Newton (GGN) of the summed
softmax cross-entropy, ``H = sum_n J_n^T Lambda_n J_n``, ``Lambda_n = diag(p_n) - p_n p_n^T``.

Structures of ``H`` (``STRUCTURES``):

- ``full``: exact, ``H = sum_n Lambda_n (x) phit_n phit_n^T`` with ``phit = [phi; 1]``;
- ``diag``: its diagonal;
- ``kron``: K-FAC, the weight block ``(sum_n Lambda_n) (x) (1/N sum_n phi_n phi_n^T)`` and the bias
  as its own block ``sum_n Lambda_n`` (exact); ``delta`` is added to the eigenvalues of the
  Kronecker product, so ``H + delta I`` is exact for this ``H``;
- ``kron-paper``: the WACV code's variant (bias folded into the input factor, one-sample Monte
  Carlo Fisher, exponential moving average over minibatches with weight ``min(1 - 1/(i+1), 0.95)``,
  each factor times ``sqrt(N)``, ``sqrt(delta)`` added to each factor), re-derived from §2.3.

The logits' predictive is Gaussian, ``f | x ~ N(mu(x), Sigma(x))`` (the GLM / linearised
predictive, exact for a linear head), from which ``bayesdyn.inference.link`` gives class
probabilities. Everything is closed-form torch: the K-FAC factors are two matrix products over
the cached features and two small eigendecompositions (no per-example Jacobians).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

STRUCTURES = ("diag", "kron", "full", "kron-paper")


def _tilde(phi: torch.Tensor, bias: bool) -> torch.Tensor:
    """``[phi, 1]`` when the head has a bias (the bias is the last input column)."""
    return torch.cat([phi, phi.new_ones(*phi.shape[:-1], 1)], -1) if bias else phi


class HeadLaplace(nn.Module):
    """Laplace posterior of one linear head; build it with ``HeadLaplace.fit``.

    Attributes (buffers): ``mean [C, D(+1)]`` (the MAP weights, bias as the last column),
    ``prior_precision`` (``delta``, a scalar), ``temperature`` (``T``: the logits' predictive
    is that of ``f / T``), ``log_likelihood`` (training log-likelihood at the MAP) and the
    curvature of the chosen structure.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, structure: str = "kron"):
        super().__init__()
        if structure not in STRUCTURES:
            raise ValueError(f"structure must be one of {STRUCTURES}, got {structure!r}")
        self.structure = structure
        self.has_bias = bias is not None
        mean = torch.cat([weight, bias[:, None]], 1) if self.has_bias else weight
        self.register_buffer("mean", mean.detach().clone())
        self.register_buffer("prior_precision", mean.new_tensor(1.0))
        self.register_buffer("temperature", mean.new_tensor(1.0))
        self.register_buffer("log_likelihood", mean.new_tensor(0.0))
        self.register_buffer("num_data", mean.new_tensor(0.0))

    # --- fitting ------------------------------------------------------------------------------
    @classmethod
    @torch.no_grad()
    def fit(cls, head: nn.Linear, features: torch.Tensor, labels: torch.Tensor,
            structure: str = "kron", offset: torch.Tensor | None = None, batch_size: int = 4096,
            generator: torch.Generator | None = None) -> HeadLaplace:
        """Fit the curvature of ``head`` (an ``nn.Linear``) on training ``features [N, D]`` and
        ``labels [N]``; ``offset [N, C]`` is added to the logits (BoostNet's history).
        ``batch_size`` bounds memory (and is the minibatch of ``kron-paper``'s moving average);
        ``generator`` draws ``kron-paper``'s Monte Carlo labels."""
        if not isinstance(head, nn.Linear):
            raise TypeError(f"head must be an nn.Linear, got {type(head).__name__}")
        if features.ndim != 2 or features.shape[1] != head.in_features:
            raise ValueError(f"features must be [N, {head.in_features}], got {tuple(features.shape)}")
        if labels.shape != features.shape[:1]:
            raise ValueError(f"labels must be [{features.shape[0]}], got {tuple(labels.shape)}")
        self = cls(head.weight, head.bias, structure)
        dtype = self.mean.dtype
        n, c = features.shape[0], head.out_features
        d = self.mean.shape[1]
        out_sum = features.new_zeros(c, c, dtype=dtype)
        d_in = features.shape[1] if structure == "kron" else d  # kron: the bias is its own block
        in_sum = features.new_zeros(d_in, d_in, dtype=dtype)
        diag_sum = features.new_zeros(c, d, dtype=dtype)
        full_sum = features.new_zeros(c * d, c * d, dtype=dtype) if structure == "full" else None
        loglik = 0.0
        for i, start in enumerate(range(0, n, batch_size)):
            phi = features[start:start + batch_size].to(dtype)
            y = labels[start:start + batch_size]
            phit = _tilde(phi, self.has_bias)
            logits = phit @ self.mean.T
            if offset is not None:
                logits = logits + offset[start:start + batch_size].to(dtype)
            loglik -= float(F.cross_entropy(logits, y, reduction="sum"))
            p = torch.softmax(logits, -1)
            if structure == "kron-paper":
                g = p - F.one_hot(torch.multinomial(p, 1, generator=generator)[:, 0], c).to(dtype)
                rho = min(1 - 1 / (i + 1), 0.95)
                out_sum.mul_(rho).add_(g.T @ g / len(y), alpha=1 - rho)
                in_sum.mul_(rho).add_(phit.T @ phit / len(y), alpha=1 - rho)
                continue
            lam_sum = torch.diag(p.sum(0)) - p.T @ p
            out_sum += lam_sum
            if structure == "kron":
                in_sum += phi.T @ phi
            elif structure == "diag":
                diag_sum += (p - p * p).T @ (phit * phit)
            else:  # full, folded order (c, d): sum_n Lambda_n (x) phit phit^T
                lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
                full_sum += torch.einsum("nab,nd,ne->adbe", lam, phit, phit).reshape(c * d, c * d)
        self.log_likelihood.fill_(loglik)
        self.num_data.fill_(n)
        self._set_curvature(out_sum, in_sum, diag_sum, full_sum)
        return self

    def _set_curvature(self, out_sum, in_sum, diag_sum, full_sum):
        n = float(self.num_data)
        if self.structure == "diag":
            self.register_buffer("ggn_diag", diag_sum)
        elif self.structure == "full":
            self.register_buffer("ggn", full_sum)
            self.register_buffer("ggn_eigenvalues", torch.linalg.eigvalsh(full_sum))
        else:
            if self.structure == "kron":
                in_sum = in_sum / n  # the input factor is the mean (K-FAC "expand")
            else:
                out_sum, in_sum = out_sum * math.sqrt(n), in_sum * math.sqrt(n)
            self.register_buffer("factor_out", out_sum)
            self.register_buffer("factor_in", in_sum)
            for name, factor in (("out", out_sum), ("in", in_sum)):
                evals, evecs = torch.linalg.eigh(factor)
                self.register_buffer(f"eig_{name}", evals.clamp_min(0))
                self.register_buffer(f"vec_{name}", evecs)

    # --- precision, evidence, prior ------------------------------------------------------------
    def curvature_eigenvalues(self) -> torch.Tensor:
        """Eigenvalues ``h`` of ``H`` (exact structures): the posterior precision's are
        ``h + delta``."""
        if self.structure == "diag":
            return self.ggn_diag.flatten()
        if self.structure == "full":
            return self.ggn_eigenvalues
        if self.structure == "kron":
            weight = torch.outer(self.eig_out, self.eig_in).flatten()
            return torch.cat([weight, self.eig_out]) if self.has_bias else weight
        raise ValueError("kron-paper adds the prior per factor: it has no eigenvalues of H alone")

    def _precision_eigenvalues(self, delta: torch.Tensor) -> torch.Tensor:
        if self.structure == "kron-paper":
            root = delta.sqrt()
            return torch.outer(self.eig_out + root, self.eig_in + root).flatten()
        return self.curvature_eigenvalues() + delta

    def log_marginal_likelihood(self, prior_precision=None) -> torch.Tensor:
        """Laplace evidence ``log p(y | x, delta) ~ log p(y | theta_MAP) - 1/2 (log det P -
        log det(delta I) + delta |theta_MAP|^2)``, differentiable in ``prior_precision``."""
        delta = self.prior_precision if prior_precision is None else torch.as_tensor(
            prior_precision, dtype=self.mean.dtype)
        num = self.mean.numel()
        log_det_ratio = self._precision_eigenvalues(delta).log().sum() - num * delta.log()
        return self.log_likelihood - 0.5 * (log_det_ratio + delta * self.mean.pow(2).sum())

    def evidence_gradient(self, delta) -> torch.Tensor:
        """``d log p(y | x, delta) / d delta`` in closed form (exact structures)."""
        h = self.curvature_eigenvalues()
        delta = torch.as_tensor(delta, dtype=h.dtype)
        return 0.5 * ((h / (delta * (h + delta))).sum() - self.mean.pow(2).sum())

    def optimal_prior_precision(self, tol: float = 1e-13) -> float:
        """The maximiser of the evidence over ``delta``: the root of ``sum_i h_i / (delta (h_i +
        delta)) = |theta|^2``, unique because the left side falls from infinity to 0. Found by
        bisection on ``log delta`` to ``tol`` (relative)."""
        if self.structure == "kron-paper":
            raise ValueError("the exact optimum needs an exact structure (diag, kron, full); tune "
                             "kron-paper on the grid")
        lo, hi = -30.0, 30.0
        while hi - lo > tol:
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if self.evidence_gradient(math.exp(mid)) > 0 else (lo, mid)
        return math.exp(0.5 * (lo + hi))

    def posterior_precision(self) -> torch.Tensor:
        """The dense precision ``[P, P]`` in laplace-torch's order (``vec(W)`` row-major, then
        ``b``), for checks on small heads."""
        c, d = self.mean.shape
        delta = self.prior_precision
        if self.structure == "diag":
            dense = torch.diag(self.ggn_diag.flatten() + delta)
            return self._unfold(dense)
        if self.structure == "full":
            return self._unfold(self.ggn + delta * torch.eye(c * d, dtype=self.mean.dtype))
        if self.structure == "kron-paper":
            eye = lambda m: torch.eye(m, dtype=self.mean.dtype)  # noqa: E731
            root = delta.sqrt()
            return self._unfold(torch.kron(self.factor_out + root * eye(c),
                                           self.factor_in + root * eye(d)))
        weight = torch.kron(self.factor_out, self.factor_in)
        blocks = [weight, self.factor_out] if self.has_bias else [weight]
        dense = torch.block_diag(*blocks)
        return dense + delta * torch.eye(dense.shape[0], dtype=dense.dtype)

    def _unfold(self, folded: torch.Tensor) -> torch.Tensor:
        """Folded order ``(c, d~)`` (bias last input column) -> ``[vec(W), b]``."""
        c, d = self.mean.shape
        if not self.has_bias:
            return folded
        index = torch.arange(c * d).view(c, d)
        order = torch.cat([index[:, :-1].flatten(), index[:, -1]])
        return folded[order][:, order]

    # --- predictive ---------------------------------------------------------------------------
    def logit_moments(self, phi: torch.Tensor, full_cov: bool = True):
        """``(mu [B, C], Sigma [B, C, C])`` of the tempered logits ``f / T`` for features
        ``phi [B, D]`` (``full_cov=False``: the variances ``[B, C]``)."""
        phi = phi.to(self.mean.dtype)
        phit = _tilde(phi, self.has_bias)
        mu = phit @ self.mean.T
        cov = self._logit_cov(phi, phit, full_cov)
        t = self.temperature
        return mu / t, cov / (t * t)

    def _logit_cov(self, phi, phit, full_cov):
        delta = self.prior_precision
        if self.structure == "diag":
            var = (phit * phit) @ (1.0 / (self.ggn_diag + delta)).T
            return torch.diag_embed(var) if full_cov else var
        if self.structure == "full":
            c, d = self.mean.shape
            sigma = torch.cholesky_inverse(torch.linalg.cholesky(
                self.ggn + delta * torch.eye(c * d, dtype=self.ggn.dtype))).view(c, d, c, d)
            cov = torch.einsum("nd,adbe,ne->nab", phit, sigma, phit)
            return cov if full_cov else cov.diagonal(dim1=-2, dim2=-1)
        if self.structure == "kron-paper":
            root = delta.sqrt()
            psi = phit @ self.vec_in
            scale = (psi * psi / (self.eig_in + root)).sum(-1)  # phit^T V'^-1 phit  [B]
            u_inv = (self.vec_out / (self.eig_out + root)) @ self.vec_out.T
            cov = scale[:, None, None] * u_inv
            return cov if full_cov else scale[:, None] * u_inv.diagonal()
        psi = phi @ self.vec_in  # kron: weight block through the eigenbases, bias block apart
        inv_eig = 1.0 / (self.eig_in[:, None] * self.eig_out[None, :] + delta)  # [D, C]
        s = (psi * psi) @ inv_eig  # [B, C]: variances in the output eigenbasis
        bias_cov = (self.vec_out / (self.eig_out + delta)) @ self.vec_out.T if self.has_bias \
            else None
        if not full_cov:
            var = s @ (self.vec_out * self.vec_out).T
            return var + bias_cov.diagonal() if bias_cov is not None else var
        cov = torch.einsum("ak,nk,bk->nab", self.vec_out, s, self.vec_out)
        return cov + bias_cov if bias_cov is not None else cov

    def sample(self, num_samples: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Weight draws ``[S, C, D(+1)]`` from the posterior (bias as the last column)."""
        c, d = self.mean.shape
        eps = torch.randn(num_samples, c, d, dtype=self.mean.dtype, device=self.mean.device,
                          generator=generator)
        delta = self.prior_precision
        if self.structure == "diag":
            return self.mean + eps / (self.ggn_diag + delta).sqrt()
        if self.structure == "full":
            chol = torch.linalg.cholesky(self.ggn + delta * torch.eye(c * d, dtype=self.ggn.dtype))
            z = torch.linalg.solve_triangular(chol.T, eps.reshape(num_samples, -1, 1), upper=True)
            return self.mean + z.reshape(num_samples, c, d)
        if self.structure == "kron-paper":
            root = delta.sqrt()
            scaled = eps / torch.outer(self.eig_out + root, self.eig_in + root).sqrt()
            return self.mean + self.vec_out @ scaled @ self.vec_in.T
        dw = d - 1 if self.has_bias else d
        w = eps[..., :dw] / torch.outer(self.eig_out, self.eig_in).add(delta).sqrt()
        out = [self.vec_out @ w @ self.vec_in.T]
        if self.has_bias:
            out.append(self.vec_out @ (eps[..., dw:] / (self.eig_out + delta).sqrt()[:, None]))
        return self.mean + torch.cat(out, -1)

    def log_density(self, value: torch.Tensor) -> torch.Tensor:
        """``log N(value; mean, P^{-1})`` of weights ``[..., C, D(+1)]`` -> ``[...]``."""
        diff = value - self.mean
        delta = self.prior_precision
        if self.structure == "diag":
            prec = self.ggn_diag + delta
            quad = (diff * diff * prec).sum((-2, -1))
        elif self.structure == "full":
            flat = diff.flatten(-2)
            prec = self.ggn + delta * torch.eye(flat.shape[-1], dtype=flat.dtype)
            quad = torch.einsum("...i,ij,...j->...", flat, prec, flat)
        elif self.structure == "kron-paper":
            root = delta.sqrt()
            z = self.vec_out.T @ diff @ self.vec_in
            quad = (z * z * torch.outer(self.eig_out + root, self.eig_in + root)).sum((-2, -1))
        else:
            dw = self.eig_in.numel()
            z = self.vec_out.T @ diff[..., :dw] @ self.vec_in
            quad = (z * z * (torch.outer(self.eig_out, self.eig_in) + delta)).sum((-2, -1))
            if self.has_bias:
                zb = self.vec_out.T @ diff[..., dw:]
                quad = quad + (zb[..., 0] ** 2 * (self.eig_out + delta)).sum(-1)
        log_det = self._precision_eigenvalues(delta).log().sum() if self.structure != "full" \
            else torch.linalg.slogdet(self.ggn + delta * torch.eye(self.ggn.shape[0],
                                                                   dtype=self.ggn.dtype))[1]
        return 0.5 * (log_det - quad - self.mean.numel() * math.log(2 * math.pi))
