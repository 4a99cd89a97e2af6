"""`python -m proxy` runs the same CLI as the `tollgate` script."""

from proxy.cli import main

raise SystemExit(main())
