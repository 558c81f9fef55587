import sys

from quantdiff.cli import main

sys.exit(main())
