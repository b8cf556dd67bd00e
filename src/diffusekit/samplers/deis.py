"""DEIS (Zhang & Chen 2022): exponential integrator, multistep on eps with polynomials in log rho."""
from __future__ import annotations

import math

from numpy.polynomial import polynomial as P

from ..config import check_choice
from .base import lagrange_basis, register, run_callback, sigma_of


def _lagrange_exp_integrals(u_start: float, u_end: float, nodes: list[float]) -> list[float]:
    """w_j = integral from u_start to u_end of L_j(u) e^u du, L_j the Lagrange basis on nodes.

    With u = log rho, e^u du = d rho: these are the weights of the eps values at the nodes.
    An antiderivative of p(u) e^u, p a polynomial, is e^u (p - p' + p'' - ...).
    """
    weights = []
    for j in range(len(nodes)):
        basis = lagrange_basis(nodes, j)

        def antiderivative(u):
            return math.exp(u) * sum((-1) ** m * P.polyval(u, P.polyder(basis, m)) for m in range(len(basis)))
        weights.append(float(antiderivative(u_end) - antiderivative(u_start)))
    return weights


def _order(i: int, n: int, solver_order: int, lower_order_final: bool) -> int:
    """Order of step i of n: up to solver_order as the memory fills; with lower_order_final and fewer
    than 15 steps, at most 2 and 1 at the last two steps (as diffusers, for stability)."""
    order = min(solver_order, i + 1)
    if lower_order_final and n < 15:
        order = min(order, n - i)
    return order


@register("deis", style="solver", solver_order=3, lower_order_final=True, set_alpha_to_one=True)
def sample_deis(denoiser, x, ts, abars, *, generator=None, callback=None, cond=None, solver_order=3,
                lower_order_final=True):
    """DEIS multistep (Zhang & Chen 2022, rhoAB-DEIS): d(x / alpha) = eps d rho with rho = sigma / alpha,
    eps interpolated through the last solver_order predictions by a polynomial in log rho
    (diffusers' DEISMultistepScheduler, solver_type "logrho"). The step to sigma = 0 lands on x0_pred;
    set_alpha_to_one=False (Sampler.plan) ends at sigma(t = 0) instead, as diffusers' DEIS does.
    """
    check_choice("solver_order", solver_order, (1, 2, 3))
    cond = cond or {}
    n = len(abars) - 1
    eps_history, log_rhos = [], []  # the multistep memory, newest last
    for i in range(n):
        abar, abar_next = float(abars[i]), float(abars[i + 1])
        pred = denoiser(x, ts[i], abar, **cond)
        eps_history = (eps_history + [pred.eps])[-solver_order:]
        log_rhos = (log_rhos + [math.log(sigma_of(abar))])[-solver_order:]
        if abar_next >= 1.0:
            x = pred.x0  # rho_next = 0: the exact limit of the first-order step is x0_pred
        else:
            order = _order(i, n, solver_order, lower_order_final)
            nodes = log_rhos[::-1][:order]  # newest first
            weights = _lagrange_exp_integrals(log_rhos[-1], math.log(sigma_of(abar_next)), nodes)
            # x_next / alpha_next = x / alpha + sum_j w_j eps_j
            increment = sum(w * e for w, e in zip(weights, reversed(eps_history)))
            x = math.sqrt(abar_next) * (x / math.sqrt(abar) + increment)
        x = run_callback(callback, i, ts[i], abar_next, x, pred.x0)
    return x
