"""``python -m flipkern.info``: versions, and which backends are built and usable (and why not).

The code lives in flipkern/_info.py: a submodule named ``info`` that the package imported
would replace the ``flipkern.info()`` function on the package; run as ``-m`` it never is.
"""
import sys

from flipkern._info import main

if __name__ == "__main__":
    sys.exit(main())
