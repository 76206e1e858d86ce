"""Writers: take a result object and a path; never compute."""
