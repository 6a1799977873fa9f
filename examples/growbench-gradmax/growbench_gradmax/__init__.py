"""growbench-gradmax: GradMax as a growbench plugin (entry point `gradmax` in the group `growbench.methods`)."""
from growbench_gradmax.gradmax import GradMax, GradMaxSettings, ReLU1, growth_matrices, swap_relus

__all__ = ["GradMax", "GradMaxSettings", "ReLU1", "growth_matrices", "swap_relus"]
__version__ = "0.1.0"
