"""GradMax through growbench's conformance kit: this file is all a plugin needs to run it."""
import pytest

from growbench.testing import MethodConformance

pytest.importorskip("growbench_gradmax", reason="the GradMax plugin is not installed: "
                    "pip install -c constraints.txt -e examples/growbench-gradmax")


class TestGradMax(MethodConformance):
    method_name = "gradmax"
    settings = {}  # the defaults; the kit's runs grow 1 unit per layer and event
