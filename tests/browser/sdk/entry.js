// What the test page (page.html, app.js) uses of the official SDK, bundled by esbuild into dist/ (tests/browser/agents_sdk.py builds it).
import { OpenAIRealtimeWebRTC, RealtimeAgent, RealtimeSession, tool } from '@openai/agents-realtime';
import { z } from 'zod';

window.AgentsRealtime = { OpenAIRealtimeWebRTC, RealtimeAgent, RealtimeSession, tool, z };
