import sys

from qdquant.cli import main

sys.exit(main())
