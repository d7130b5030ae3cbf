import sys

from fasttune.cli import main

sys.exit(main())
