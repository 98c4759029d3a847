from ropo.cli import run

raise SystemExit(run())
