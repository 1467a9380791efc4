"""Numerics: noise schedules (the process), step schedules (the grid) and solvers (the update).

Registries: :data:`SOLVERS` and :data:`STEP_SCHEDULES`, keyed by the names users know from
k-diffusion and ComfyUI. Adding a solver = one file plus one ``SOLVERS.add`` line here.
"""

from diffsample.solvers.solver import Denoise, Grid, NoiseFn, NoiseSchedule, Solver
from diffsample.solvers.dpm_solver import DPMSolverPP
from diffsample.solvers.euler import Euler
from diffsample.solvers.flow_sde import FlowSDE
from diffsample.solvers.heun import Heun
from diffsample.solvers.noise_schedules import VE, DiscreteVP, LinearVP, RectifiedFlow
from diffsample.core.registry import Registry, parse_spec
from diffsample.solvers.stein import SteinDiff
from diffsample.solvers.step_schedules import FlowShift, Karras, LambdaUniform, PolyExponential, TimeUniform, fixed
from diffsample.solvers.unipc import UniPC

SOLVERS: Registry[Solver] = Registry("solver")
SOLVERS.add("euler", Euler, "Euler / DDIM (eta=0), = DPM-Solver++(1); order 1, 1 NFE/step", eta=0.0)
SOLVERS.add("ddim", Euler, "alias of euler: DDIM with eta=0 (pass eta=... for stochastic DDIM)", eta=0.0)
SOLVERS.add("euler_ancestral", Euler, "ancestral Euler (eta=1) = DDPM posterior step; stochastic", eta=1.0)
SOLVERS.add("flow_sde", FlowSDE, "rectified-flow SDE, g = 0.7 sqrt(t/(1-t)) (Flow-GRPO); flow models only; stochastic", noise_level=0.7)
SOLVERS.add("heun", Heun, "Heun (EDM Alg. 1, no churn); order 2, 2 NFE/step (1 on the step to sigma=0)")
SOLVERS.add("dpmpp_2m", DPMSolverPP, "DPM-Solver++(2M) multistep; order 2, 1 NFE/step", order=2)
SOLVERS.add("dpmpp_3m", DPMSolverPP, "DPM-Solver++(3M) multistep; order 3, 1 NFE/step", order=3)
SOLVERS.add("dpmpp_2m_sde", DPMSolverPP, "DPM-Solver++(2M) SDE (eta=1, midpoint); stochastic", order=2, eta=1.0)
SOLVERS.add("dpmpp_3m_sde", DPMSolverPP, "DPM-Solver++(3M) SDE (eta=1); stochastic", order=3, eta=1.0)
SOLVERS.add("unipc_bh1", UniPC, "UniPC-2 with UniC corrector, B(h)=h; order 3, 1 NFE/step", predictor_order=2, variant="bh1")
SOLVERS.add("unipc_bh2", UniPC, "UniPC-2 with UniC corrector, B(h)=e^h-1; order 3, 1 NFE/step", predictor_order=2, variant="bh2")


def _stein_dpm(eta: float = 0.0, **options) -> SteinDiff:
    return SteinDiff(base=DPMSolverPP(order=2, eta=float(eta)), **options)


SOLVERS.add("stein-dpm", _stein_dpm, "experimental: DPM-Solver++(2M) + SteinDiff (transition coupling, first step, gamma in [0.5, 2]); nfe as 2M, +10 model evals; eta=1: the 2M SDE base (stochastic)")
SOLVERS.add("stein-unipc", SteinDiff, "experimental: UniPC-bh2 + SteinDiff (transition coupling, first step, gamma in [0.5, 2]); nfe as UniPC, +10 model evals", base=UniPC(predictor_order=2, variant="bh2"))

STEP_SCHEDULES: Registry = Registry("step schedule")
STEP_SCHEDULES.add("karras", Karras, "Karras rho=7 on the VE sigma (EDM eq. 5)")
STEP_SCHEDULES.add("exponential", LambdaUniform, "uniform in log VE-sigma (k-diffusion get_sigmas_exponential)")
STEP_SCHEDULES.add("lambda_uniform", LambdaUniform, "uniform in lambda = half log-SNR (DPM-Solver 'logSNR'); = exponential")
STEP_SCHEDULES.add("polyexponential", PolyExponential, "k-diffusion polyexponential (rho=1 is exponential)")
STEP_SCHEDULES.add("linspace", TimeUniform, "uniform in t, diffusers 'linspace' spacing", spacing="linspace")
STEP_SCHEDULES.add("leading", TimeUniform, "uniform in t, diffusers 'leading' spacing", spacing="leading")
STEP_SCHEDULES.add("trailing", TimeUniform, "uniform in t, diffusers 'trailing' spacing", spacing="trailing")
STEP_SCHEDULES.add("flow_shift", FlowShift, "SD3/FLUX shifted time-uniform spacing (rectified flow only), shift=3")

__all__ = [
    "SOLVERS", "STEP_SCHEDULES", "Denoise", "DPMSolverPP", "DiscreteVP", "Euler", "FlowSDE", "FlowShift", "Grid",
    "Heun", "Karras", "LambdaUniform", "LinearVP", "NoiseFn", "NoiseSchedule", "PolyExponential",
    "RectifiedFlow", "Registry", "Solver", "SteinDiff", "TimeUniform", "UniPC", "VE", "fixed", "parse_spec",
]
