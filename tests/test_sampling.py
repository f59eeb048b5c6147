"""The few-step loop, its noise conventions and backward simulation."""

import torch
from dmd2_kernels.renoise import philox_normal_reference

from dmd2_serve.model.sampling import add_noise, few_step_sample, philox_sample, predict_x0, x0_from_eps
from dmd2_serve.model.schedule import Schedule
from dmd2_train.simulate import backward_simulate

ABAR = torch.linspace(0.9999, 0.0047, 1000, dtype=torch.float64)
SCHEDULE = (999, 749, 499, 249)


def sched(steps=SCHEDULE, abar=ABAR):
    return Schedule(abar, timesteps=steps)


def toy_eps_fn(calls: list | None = None):
    """A deterministic stand-in for a UNet that depends on x_t and t."""
    def eps(x_t, t):
        if calls is not None:
            calls.append((x_t.clone(), t.clone()))
        return torch.tanh(x_t) * (t.float().reshape(-1, 1, 1, 1) / 1000)
    return eps


def test_add_noise_inverts():
    torch.manual_seed(0)
    x0, eps = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    t = torch.tensor([0, 500, 999])
    torch.testing.assert_close(x0_from_eps(add_noise(x0, eps, t, ABAR), eps, t, ABAR), x0, atol=1e-4, rtol=1e-4)


def test_one_step_is_x0_of_noise():
    noise = torch.randn(2, 1, 4, 4)
    out = few_step_sample(toy_eps_fn(), noise, sched((999,)), [])
    torch.testing.assert_close(out, predict_x0(toy_eps_fn(), noise, 999, ABAR))


def test_loop_renoises_with_the_given_noise():
    noises = [torch.randn(2, 1, 4, 4) for _ in SCHEDULE]
    calls: list = []
    out = few_step_sample(toy_eps_fn(calls), noises[0], sched(), noises[1:])
    assert [int(c[1][0]) for c in calls] == list(SCHEDULE)
    # step i's input is add_noise(x0 of step i-1, noises[i], t_i)
    x0_prev = x0_from_eps(calls[0][0], toy_eps_fn()(*calls[0]), calls[0][1], ABAR)
    torch.testing.assert_close(calls[1][0], add_noise(x0_prev, noises[1], calls[1][1], ABAR))
    assert out.shape == noises[0].shape


def test_backward_simulation_equals_inference_prefix():
    torch.manual_seed(0)
    noises = [torch.randn(3, 1, 4, 4) for _ in SCHEDULE]
    calls: list = []
    few_step_sample(toy_eps_fn(calls), noises[0], sched(), noises[1:])
    for k in range(len(SCHEDULE)):
        sim = backward_simulate(toy_eps_fn(), sched(), k, noises[: k + 1])
        assert sim.k == k
        assert torch.equal(sim.t, calls[k][1])
        assert torch.equal(sim.x_t, calls[k][0]), f"input of step {k} differs from inference"


def test_philox_sampler_is_the_loop_with_kernel_noise():
    # philox_sample == few_step_sample fed the kernel's noise streams 0..3 (reference numbers).
    seeds = torch.tensor([11, 12])
    calls: list = []
    got = philox_sample(toy_eps_fn(calls), seeds, (1, 4, 4), sched(abar=ABAR.float()))
    noises = [philox_normal_reference(seeds, i, 16).reshape(2, 1, 4, 4) for i in range(len(SCHEDULE))]
    want = few_step_sample(toy_eps_fn(), noises[0], sched(abar=ABAR.float()), noises[1:])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert [int(c[1][0]) for c in calls] == list(SCHEDULE)


def test_philox_sampler_does_not_depend_on_batch():
    alone = philox_sample(toy_eps_fn(), torch.tensor([7]), (1, 4, 4), sched(abar=ABAR.float()))
    together = philox_sample(toy_eps_fn(), torch.tensor([1, 7, 2]), (1, 4, 4), sched(abar=ABAR.float()))
    assert torch.equal(alone[0], together[1])
    assert not torch.equal(together[0], together[1])
