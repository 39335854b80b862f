"""Request handling logic behind the routes: each ``create`` returns a response model or an SSE frame iterator."""
