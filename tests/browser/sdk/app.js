// The test page's app: the official SDK used as its docs show, with only the URL of the calls endpoint changed.
// The test hands it a client secret minted by "the backend", clicks Connect and reads window.sdkApp.
const { RealtimeAgent, RealtimeSession, tool, z } = window.AgentsRealtime;

const app = (window.sdkApp = {
  ready: true,
  state: 'disconnected',
  events: [], // every server event the SDK's transport passed on: {type, at: performance.now(), event}
  sessionEvents: [], // the RealtimeSession's own events, by name
  errors: [], // the session's `error` events and a rejected connect(), as text
  toolCalls: [], // the tool's execute() arguments
  clickAt: null,
  sessionUpdatedAt: null,
  session: null,
  configure(clientSecret, callsUrl) {
    Object.assign(app, { clientSecret, callsUrl });
  },
});

const getWeather = tool({
  name: 'get_weather',
  description: 'The weather in a city.',
  parameters: z.object({ city: z.string() }),
  execute: async ({ city }) => {
    app.toolCalls.push({ city });
    return `sunny in ${city}, 21 degrees`;
  },
});

// Its own instructions: the backend's client secret locks others, and the relay keeps those.
const agent = new RealtimeAgent({ name: 'Assistant', instructions: 'Speak like a pirate.', tools: [getWeather] });

function describe(error) {
  const inner = error?.error ?? error;
  return inner instanceof Error ? `${inner.name}: ${inner.message}` : JSON.stringify(inner);
}

function newSession() {
  const session = new RealtimeSession(agent, { transport: 'webrtc' });
  session.on('transport_event', (event) => {
    app.events.push({ type: event.type, at: performance.now(), event });
    if (event.type === 'session.updated' && app.sessionUpdatedAt === null) app.sessionUpdatedAt = performance.now();
  });
  session.on('error', (error) => app.errors.push(describe(error)));
  for (const name of ['agent_start', 'agent_end', 'audio_stopped', 'audio_interrupted', 'agent_tool_start',
    'agent_tool_end', 'history_added']) {
    session.on(name, () => app.sessionEvents.push(name));
  }
  return session;
}

document.querySelector('#connect').addEventListener('click', async (click) => {
  Object.assign(app, { clickAt: click.timeStamp, sessionUpdatedAt: null, state: 'connecting' });
  app.session = newSession();
  try {
    await app.session.connect({ apiKey: app.clientSecret, url: app.callsUrl });
    app.state = 'connected';
  } catch (error) {
    app.errors.push(describe(error));
    app.state = 'failed';
  }
});

document.querySelector('#disconnect').addEventListener('click', () => {
  app.session?.close();
  app.state = 'disconnected';
});
