"""Building blocks of the crawl-mix stage: readers, quality filters and deduplication keys."""
