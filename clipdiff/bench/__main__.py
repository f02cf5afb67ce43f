import sys

from clipdiff.bench.cli import main

sys.exit(main())
