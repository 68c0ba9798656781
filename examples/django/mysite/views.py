import os

from django.http import HttpResponse

import fugue

VERSION = "v1"


def hello(request):
    return HttpResponse(f"hello from django worker {fugue.worker_id()} pid {os.getpid()} "
                        f"generation {fugue.generation()} version {VERSION}\n", content_type="text/plain")
