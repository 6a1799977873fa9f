"""`fixed`: a fixed-size network trained with the suite's budget; the baseline every suite has.

Its size is the suite's starting size, or `method_settings.<name>.hidden` (e.g. an alias
`fixed-large: {method: fixed, hidden: [128, 128]}` for a fixed network at the growth cap).
"""
from __future__ import annotations

from typing import ClassVar

from growbench.methods.base import GrowthMethod


class Fixed(GrowthMethod):
    name: ClassVar[str] = "fixed"
    grows: ClassVar[bool] = False
