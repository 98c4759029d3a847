from ropo.cli import main

raise SystemExit(main())
