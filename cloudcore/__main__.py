import sys

from cloudcore.cli import main

sys.exit(main())
