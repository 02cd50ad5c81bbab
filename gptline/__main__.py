import sys

from gptline.cli.main import main

sys.exit(main())
