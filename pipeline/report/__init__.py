"""`splinter report OUT`: a self-contained HTML page for any job's output, read from the run's own records.

readers.py reads (never recomputes) what a job wrote; charts.py draws SVG with matplotlib; sections.py
lays out each job kind's cards, charts and tables; page.py renders and writes the page.
"""
