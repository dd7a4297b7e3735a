"""One deployment of the default app (1 attention + 2 expert workers, default limits; images allowed
from 127.0.0.1, 3 per request) for every module here: the OpenAI API, structured outputs and tool
calls, many streams, images. A Ray, Serve and a gang cost ~25 s to start on 2 cores, so they start
once for the package (`__init__.py` makes it one). The fuzz test keeps an app of its own, with its
own limits (a 60 s request timeout, 1 MB bodies)."""

import pytest

from tests.router.conftest import deploy, running_local_ray

package_ray = pytest.fixture(running_local_ray, scope="package", name="package_ray")


@pytest.fixture(scope="package")
def live(package_ray, tmp_path_factory):
    return deploy(tmp_path_factory.mktemp("default-app"), expert_workers=2,
                  images={"allowed_hosts": ["127.0.0.1"], "max_per_request": 3})
