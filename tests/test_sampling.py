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


def by_hand(eps_fn, noises: list, steps=SCHEDULE) -> tuple[list, torch.Tensor]:
    """The few-step loop written out from its equations in float64: (each step's input, the last x0).

    Step i: eps = G(x, t_i); x0 = (x - sqrt(1 - abar_i) eps) / sqrt(abar_i); the next input is
    sqrt(abar_{i+1}) x0 + sqrt(1 - abar_{i+1}) noises[i + 1] (DDPM Eq. 4 with fresh noise).
    """
    x, inputs = noises[0].double(), []
    for i, t in enumerate(steps):
        inputs.append(x)
        a = float(ABAR[t])
        eps = eps_fn(x.float(), torch.full((x.shape[0],), t)).double()
        x0 = (x - (1 - a) ** 0.5 * eps) / a ** 0.5
        if i + 1 < len(steps):
            a_next = float(ABAR[steps[i + 1]])
            x = a_next ** 0.5 * x0 + (1 - a_next) ** 0.5 * noises[i + 1].double()
    return inputs, x0


def test_one_step_is_x0_of_noise():
    torch.manual_seed(0)
    noise = torch.randn(2, 1, 4, 4)
    out = few_step_sample(toy_eps_fn(), noise, sched((999,)), [])
    a = float(ABAR[999])
    want = (noise.double() - (1 - a) ** 0.5 * toy_eps_fn()(noise, torch.tensor([999, 999])).double()) / a ** 0.5
    torch.testing.assert_close(out.double(), want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(predict_x0(toy_eps_fn(), noise, 999, ABAR).double(), want, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(out, noise, atol=0.1)  # the conversion did something at t = 999


def test_a_perfect_denoiser_gives_back_the_data():
    # A denoiser that knows x0 predicts eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar): every step's
    # x0 estimate, hence the loop's answer, is x0 whatever the noise and the number of steps.
    torch.manual_seed(0)
    x0 = torch.rand(2, 1, 4, 4) * 2 - 1

    def oracle(x_t, t):
        a = ABAR[t].reshape(-1, 1, 1, 1)
        return ((x_t.double() - a.sqrt() * x0.double()) / (1 - a).sqrt()).float()

    for steps in ((999,), SCHEDULE, (999, 500, 20)):
        noises = [torch.randn(2, 1, 4, 4) for _ in steps]
        out = few_step_sample(oracle, noises[0], sched(steps), noises[1:])
        torch.testing.assert_close(out, x0, atol=1e-4, rtol=0)


def test_loop_renoises_with_the_given_noise():
    torch.manual_seed(0)
    noises = [torch.randn(2, 1, 4, 4) for _ in SCHEDULE]
    calls: list = []
    out = few_step_sample(toy_eps_fn(calls), noises[0], sched(), noises[1:])
    assert [int(c[1][0]) for c in calls] == list(SCHEDULE)
    inputs, want = by_hand(toy_eps_fn(), noises)
    for k, (call, x_t) in enumerate(zip(calls, inputs)):
        torch.testing.assert_close(call[0].double(), x_t, atol=1e-4, rtol=1e-4, msg=f"input of step {k}")
    torch.testing.assert_close(out.double(), want, atol=1e-4, rtol=1e-4)
    # each draw matters: the same noises in another order give another image
    _, swapped = by_hand(toy_eps_fn(), [noises[0], noises[2], noises[1], noises[3]])
    assert not torch.allclose(swapped, want, atol=1e-2)


def test_backward_simulation_equals_inference_prefix():
    torch.manual_seed(0)
    noises = [torch.randn(3, 1, 4, 4) for _ in SCHEDULE]
    calls: list = []
    few_step_sample(toy_eps_fn(calls), noises[0], sched(), noises[1:])
    inputs, _ = by_hand(toy_eps_fn(), noises)
    for k in range(len(SCHEDULE)):
        sim = backward_simulate(toy_eps_fn(), sched(), k, noises[: k + 1])
        assert sim.k == k
        assert torch.equal(sim.t, calls[k][1])
        assert torch.equal(sim.x_t, calls[k][0]), f"input of step {k} differs from inference"
        torch.testing.assert_close(sim.x_t.double(), inputs[k], atol=1e-4, rtol=1e-4)


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
