"""Test tooling, not part of the package: the t4 profile's hub repos in miniature (`twins`, `pope_twin`),
the published values they are held to (`published`), a local hub that serves them (`hub_server`) and an
https proxy for the web images (`web_proxy`). The root conftest.py serves them for `LLAVA_NB_PROFILE=t4`."""
