import math

import pytest
import torch

from common.errors import UserError
from obsdiff.timesteps import timestep_weights


def test_log_decrease_for_25_steps():
    w = timestep_weights(25)
    assert w.shape == (25,) and w.dtype == torch.float32
    # float32 weights against float64 formulas: a few roundings of u = 6e-8 relative each (1e-6 leaves > 5x)
    assert w[0].item() == pytest.approx(1.2, abs=1e-6)
    assert w[-1].item() == pytest.approx(0.8, abs=1e-6)
    assert bool((w[1:] < w[:-1]).all()), "weights must strictly decrease over the sampling loop"
    # step i carries the value of index T-1-i of the rising log curve
    i = 7
    expected = 0.8 + 0.4 * math.log(1 + (25 - 1 - i)) / math.log(25)
    assert w[i].item() == pytest.approx(expected, rel=1e-6)
    # log-decrease drops slowly at first and fast at the end
    assert (w[0] - w[1]) < (w[-2] - w[-1])


def test_linear_uniform_and_edge_cases():
    lin = timestep_weights(5, "linear", 1.2, 0.8)
    assert torch.allclose(lin, torch.tensor([1.2, 1.1, 1.0, 0.9, 0.8]))
    assert torch.equal(timestep_weights(4, "uniform"), torch.ones(4))
    assert timestep_weights(1).tolist() == pytest.approx([1.2])
    custom = timestep_weights(10, "log", w_max=2.0, w_min=0.5)
    assert custom[0].item() == pytest.approx(2.0) and custom[-1].item() == pytest.approx(0.5)


@pytest.mark.parametrize("args", [(0,), (10, "cosine"), (10, "log", -1.0, 0.8)])
def test_bad_weighting_is_a_user_error(args):
    with pytest.raises(UserError):
        timestep_weights(*args)
