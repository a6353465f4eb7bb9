import sys

from otr_megatron.cli import main

sys.exit(main())
