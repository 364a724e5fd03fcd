"""What a person looks at: the report page (``html``, with ``report.css`` and ``report.js`` as package
data), the channel-group picture's layout (``picture``), SVG and PNG drawing (``svg``, ``draw``)."""
