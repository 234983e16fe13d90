import sys

from shardify.cli import main

sys.exit(main())
