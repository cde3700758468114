"""``python -m hrkernels``: the same as the ``hrkernels`` command."""

from hrkernels.cli import main

raise SystemExit(main())
