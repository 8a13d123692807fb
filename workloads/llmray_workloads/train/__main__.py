"""``python -m llmray_workloads.train --config <file|->``."""

from .driver import main

raise SystemExit(main())
