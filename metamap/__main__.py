import sys

from metamap.cli import main

sys.exit(main())
