"""``indicfm data review``: a local web page to judge a prepared cache and tune its thresholds.

``rules`` re-applies thresholds to the features file, ``texts`` fetches a document's text from its
source, ``server`` answers the page's requests; ``page.html`` is the page.
"""
