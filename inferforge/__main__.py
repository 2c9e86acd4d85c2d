import sys

from inferforge.cli import main

sys.exit(main())
